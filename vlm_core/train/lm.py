"""Language-model stages (alignment and instruction tuning): packed batches and the next-token loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_core.data.dataset import SFTDataset
from vlm_core.data.packing import PackedLoader, SampleStream
from vlm_core.train.loop import StepOutput
from vlm_core.types import IGNORE_INDEX, PackedBatch


class PackedSteps:
    """``grad_accum`` packed micro-batches per optimizer step, from a resumable sample stream."""

    def __init__(
        self, dataset: SFTDataset, batch_size: int, grad_accum: int, row_len: int, seed: int,
        device: torch.device,
    ) -> None:
        self.grad_accum = grad_accum
        self.device = device
        stream = SampleStream(len(dataset), batch_size // grad_accum, seed)
        self.loader = PackedLoader(dataset, stream, row_len)
        self._iter = iter(self.loader)

    def next_step(self) -> list[PackedBatch]:
        return [next(self._iter).to(self.device) for _ in range(self.grad_accum)]

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._iter = iter(self.loader)


def lm_loss(model: nn.Module, batch: PackedBatch) -> StepOutput:
    """Summed next-token cross-entropy over the assistant tokens (labels were shifted by the packer)."""
    logits = model(batch)  # [total, V]
    loss_sum = F.cross_entropy(logits.float(), batch.labels, ignore_index=IGNORE_INDEX, reduction="sum")
    units = int((batch.labels != IGNORE_INDEX).sum())
    stats = {"tokens": batch.num_real_tokens, "slots": batch.total, "samples": batch.num_samples}
    return StepOutput(loss_sum, units, stats)


def summarize_lm(window: dict[str, float]) -> dict[str, float]:
    """Per-log-window throughput and packing efficiency (real tokens / slots)."""
    return {
        "tokens_per_s": window["tokens"] / window["elapsed_s"],
        "samples_per_s": window["samples"] / window["elapsed_s"],
        "packing_efficiency": window["tokens"] / window["slots"],
    }
