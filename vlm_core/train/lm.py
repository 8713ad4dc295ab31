"""Language-model stages (alignment and instruction tuning): packed batches and the next-token loss."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vlm_core.data.curriculum import CurriculumStream, sample_difficulty, sample_in_skills
from vlm_core.data.dataset import SFTDataset
from vlm_core.data.packing import PackedLoader, SampleStream
from vlm_core.kernels.linear_cross_entropy import check_labels, linear_cross_entropy_triton
from vlm_core.parallel.data import DataParallelStream
from vlm_core.parallel.loss import token_cross_entropy
from vlm_core.train.loop import StepOutput
from vlm_core.types import IGNORE_INDEX, PackedBatch

log = logging.getLogger(__name__)


class PackedSteps:
    """``grad_accum`` packed micro-batches per optimizer step, from a resumable sample stream.

    With ``curriculum_steps`` > 0 the first steps draw only from samples whose ``meta.n_objects`` is under
    a rising cap, and with ``focus_steps`` > 0 the first steps draw only from samples of ``focus_skills``
    (:class:`CurriculumStream`); afterwards, and without either, every epoch is a fresh permutation of
    the dataset. ``data_parallel=(rank, size)`` keeps this data-parallel rank's share
    of every micro-batch (the ranks' shares together are the single-process batch).
    """

    def __init__(
        self, dataset: SFTDataset, batch_size: int, grad_accum: int, row_len: int, seed: int,
        device: torch.device, curriculum_steps: int = 0, curriculum_start: int = 1,
        focus_skills: tuple[str, ...] = (), focus_steps: int = 0, data_parallel: tuple[int, int] = (0, 1),
        pad_rows: bool = True,
    ) -> None:
        self.grad_accum = grad_accum
        self.device = device
        micro_batch = batch_size // grad_accum
        if curriculum_steps or focus_steps:
            difficulty = sample_difficulty(dataset.samples)
            focus = sample_in_skills(dataset.samples, focus_skills) if focus_steps else None
            if focus is not None and not focus.any():  # e.g. data.world.skills=[count], or untagged LLaVA data
                log.warning("train.focus_skills=%s: no training sample has one of these skills; no focus phase",
                            list(focus_skills))
                focus, focus_steps = None, 0
            stream = CurriculumStream(difficulty, micro_batch, seed, curriculum_start, curriculum_steps * grad_accum,
                                      focus=focus, focus_steps=focus_steps * grad_accum)
        else:
            stream = SampleStream(len(dataset), micro_batch, seed)
        if data_parallel[1] > 1:
            stream = DataParallelStream(stream, *data_parallel)
        self.loader = PackedLoader(dataset, stream, row_len, pad_rows=pad_rows)
        self._iter = iter(self.loader)

    def next_step(self) -> list[PackedBatch]:
        return [next(self._iter).to(self.device) for _ in range(self.grad_accum)]

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._iter = iter(self.loader)


def lm_loss(model: nn.Module, batch: PackedBatch, per_sample: bool = False) -> StepOutput:
    """Next-token cross-entropy over the assistant tokens (labels were shifted by the packer), summed.

    ``per_sample=False`` weighs every supervised token the same (LLaVA's convention); the loop divides
    by the step's token count. ``per_sample=True`` weighs every sample the same: a token's loss is
    divided by its sample's number of supervised tokens and the loop divides by the sample count. On the
    world, a 6-object caption has ~50 answer tokens and a colour question 2, so by tokens the captions
    carry half of the gradient; by samples each skill carries its share of the data.

    Only the rows that carry a label go through the LM head: on the world's data that is ~15% of the
    packed tokens, and the [total, V] logits of the rest would be computed only to be ignored. With the
    fused kernels (``model.kernel_impl``) not even those logits exist at once.
    """
    # What needs the host (which rows carry a label, how many units) is read before the forward is queued: a
    # boolean index of its output would hold the host until the whole forward had run on the device.
    label_rows = (batch.labels != IGNORE_INDEX).nonzero().squeeze(1)  # [n_labels], one host sync
    labels = batch.labels[label_rows]  # [n_labels]
    select = getattr(model, "select_kernels", None)  # the VLM's; a stand-in model may have none
    impls = select(batch.labels.device) if select is not None else getattr(model.decoder, "kernel_impls", {})
    fused_head = impls.get("linear_cross_entropy") == "triton"
    if fused_head:
        check_labels(labels, model.decoder.head_weight.shape[0])  # ValueError if out of the vocabulary
    stats = {"tokens": batch.num_real_tokens, "slots": batch.total, "samples": batch.num_samples}
    sample_tokens = None  # per_sample: [n_labels], the supervised-token count of each token's sample
    if per_sample:
        seqlens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()  # [n_segments]
        segment = torch.repeat_interleave(torch.arange(len(seqlens), device=seqlens.device), seqlens,
                                          output_size=batch.total)  # [total]
        owner = segment[label_rows]  # [n_labels]: the segment (sample) of each supervised token
        per_segment = torch.bincount(owner, minlength=len(seqlens)).to(torch.float32)  # [n_segments]
        sample_tokens, units = per_segment[owner], int((per_segment > 0).sum())
    else:
        units = label_rows.numel()
    hidden = model.hidden_states(batch)[label_rows]  # [n_labels, D]: only these rows go through the LM head
    if fused_head:
        # Fused and chunked (vlm_core/kernels/linear_cross_entropy.py): Decoder.select_kernels chose it, so the
        # head is a plain single-device layer; the gradients are computed in the forward's pass.
        token_weight = None if sample_tokens is None else sample_tokens.reciprocal()  # each sample weighs 1
        loss_sum = linear_cross_entropy_triton(hidden, model.decoder.head_weight, labels, token_weight,
                                               labels_checked=True)
    else:
        # [n_labels]; under tensor parallelism from this rank's vocabulary slice of the logits (never gathered)
        token_loss = token_cross_entropy(model.decoder, hidden, labels)
        loss_sum = token_loss.sum() if sample_tokens is None else (token_loss / sample_tokens).sum()
    return StepOutput(loss_sum, units, stats)


def summarize_lm(window: dict[str, float]) -> dict[str, float]:
    """Per-log-window throughput and packing efficiency (real tokens / slots)."""
    return {
        "tokens_per_s": window["tokens"] / window["elapsed_s"],
        "samples_per_s": window["samples"] / window["elapsed_s"],
        "packing_efficiency": window["tokens"] / window["slots"],
    }
