"""lm_loss: token-weighted and sample-weighted cross-entropy over the supervised rows only."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vlm_core.train.lm import lm_loss
from vlm_core.types import IGNORE_INDEX, PackedBatch


class FixedHidden(nn.Module):
    """Stands in for the VLM: fixed hidden states and a linear LM head."""

    def __init__(self, hidden: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.decoder = nn.Module()
        self.decoder.head = nn.Linear(hidden.shape[1], vocab, bias=False)
        self.decoder.logits = self.decoder.head

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        return self.hidden


def make_batch(labels: list[int], seqlens: list[int]) -> PackedBatch:
    total = len(labels)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    return PackedBatch(
        input_ids=torch.zeros(total, dtype=torch.int64), position_ids=torch.zeros(total, dtype=torch.int64),
        cu_seqlens=cu, max_seqlen=max(seqlens), bidir_group=torch.zeros(total, dtype=torch.int32),
        labels=torch.tensor(labels), images=torch.zeros(0, 3, 4, 4), rows=1, row_len=total,
        num_samples=len(seqlens), num_real_tokens=total,
    )


def test_token_and_sample_weighting() -> None:
    torch.manual_seed(0)
    x = IGNORE_INDEX
    # sample 0: 1 supervised token; sample 1: 3; a padding segment with none
    labels = [x, 3, x, x, 1, 2, 0, x, x]
    batch = make_batch(labels, [3, 4, 2])
    model = FixedHidden(torch.randn(9, 8), vocab=5)
    per_token = F.cross_entropy(model.decoder.logits(model.hidden), torch.tensor(labels), reduction="none",
                                ignore_index=IGNORE_INDEX)
    by_tokens = lm_loss(model, batch)
    assert by_tokens.units == 4
    torch.testing.assert_close(by_tokens.loss_sum, per_token.sum())
    by_samples = lm_loss(model, batch, per_sample=True)
    assert by_samples.units == 2  # the padding segment has no supervised token and does not count
    expected = per_token[1] + per_token[4:7].sum() / 3
    torch.testing.assert_close(by_samples.loss_sum, expected)
    assert by_samples.loss_sum.item() != pytest.approx(by_tokens.loss_sum.item())


# ops that copy a device value to the host (a sync on CUDA)
HOST_READS = {"nonzero", "_local_scalar_dense", "masked_select", "is_nonzero", "item", "tolist", "_unique2", "unique_dim"}


class _Recorder(TorchDispatchMode):
    """The ATen ops run, in order; Tensor.tolist (a host read that dispatches no op) counted as "tolist".

    With ``arm_cuda``, CUDA's sync debug mode is set to "error" at the forward's first GPU work (embedding or
    convolution), so that on a GPU any synchronizing call after it raises, those no op list shows included (a
    copy from pageable host memory, a stream synchronize)."""

    FIRST_WORK = ("embedding", "convolution")

    def __init__(self, arm_cuda: bool = False) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.arm_cuda = arm_cuda

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.arm_cuda and name in self.FIRST_WORK and not set(self.FIRST_WORK) & set(self.ops):
            torch.cuda.set_sync_debug_mode("error")
        self.ops.append(name)
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        if self.arm_cuda:
            torch.cuda.set_sync_debug_mode("default")
        return super().__exit__(*exc)


@pytest.mark.parametrize(("image_attention", "attn_impl"),
                         [("bidirectional", "reference"), ("causal", "reference"), ("bidirectional", "triton")])
def test_the_step_reads_the_device_only_before_its_forward(monkeypatch, image_attention, attn_impl) -> None:
    """On a GPU, a host read (nonzero, item, tolist) after the forward's first kernel holds the host until
    everything queued has run; before it, the read costs nothing. lm_loss on a real VLM reads the label rows, the
    image rows, cu_seqlens' checks (and, with Triton, the windows) before its first embedding or convolution.
    With Triton on a GPU (scripts/gpu_session.sh check runs this file) the model runs on CUDA, and CUDA's sync
    debug mode, armed at the first embedding or convolution, turns any later sync into an error."""
    on_gpu = attn_impl == "triton" and torch.cuda.is_available()
    if attn_impl == "triton":
        from vlm_core.kernels.triton_runtime import triton_status

        if not on_gpu:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        ok, reason = triton_status("cuda" if on_gpu else "cpu")
        if not ok:
            pytest.skip(reason)
    from benchmarks.bench_train import model_config
    from vlm_core.data.packing import pack
    from vlm_core.model.vlm import VLM
    from vlm_core.types import TokenizedSample

    device = torch.device("cuda" if on_gpu else "cpu")
    # with "triton", every fused kernel too: the projector, and the LM head whose label check reads the host
    cfg = replace(model_config("tiny"), image_attention=image_attention, attn_impl=attn_impl, kernel_impl=attn_impl,
                  layers=1)
    model = VLM(cfg, vocab_size=50, image_token_id=49).to(device)
    P = cfg.vision.num_patches
    g = torch.Generator().manual_seed(0)

    def sample(text: int) -> TokenizedSample:
        ids = torch.cat([torch.full((P,), 49), torch.randint(0, 40, (text,), generator=g)])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[-3:] = True
        groups = torch.cat([torch.ones(P, dtype=torch.int32), torch.zeros(text, dtype=torch.int32)])
        return TokenizedSample(ids, mask, groups, torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size,
                                                              generator=g))

    def batch():  # new tensors each time: the per-batch memos (packing_memo.py) miss, as on a new batch
        return pack([sample(5), sample(9), sample(2)], 2 * (P + 9)).to(device)

    if on_gpu:  # compiles and tunes the kernels of both passes (which syncs) and builds the RoPE tables
        lm_loss(model, batch()).loss_sum.backward()
    recorder = _Recorder(arm_cuda=on_gpu)
    real_tolist = torch.Tensor.tolist

    def tolist(tensor):
        recorder.ops.append("tolist")
        return real_tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with recorder:
        out = lm_loss(model, batch())
        out.loss_sum.backward()  # the backward, on a GPU, is held to the same rule
    ops = recorder.ops
    first_work = min(ops.index(name) for name in recorder.FIRST_WORK)
    reads = [i for i, name in enumerate(ops) if name in HOST_READS]
    assert reads and "tolist" in ops, ops[:first_work + 1]  # the reads this test is about did happen
    assert max(reads) < first_work, [ops[i] for i in reads if i > first_work]
    assert out.units == 9
    expected = {"linear_cross_entropy": "triton", "projector": "triton"} if attn_impl == "triton" else {}
    assert expected.items() <= model.decoder.kernel_impls.items()
    if attn_impl == "triton":  # the fused head's label check, moved before the forward, still raises
        bad = batch()
        bad.labels[bad.labels != IGNORE_INDEX] = 999
        with pytest.raises(ValueError, match="outside the vocabulary"):
            lm_loss(model, bad)


def test_unpadded_rows_compute_the_padded_loss_and_gradients() -> None:
    """Padding is its own segments with no labels and no image: a VLM's loss and gradients on a batch packed
    without it (data.pad_rows=false, a GPU's default) are the padded batch's, up to float rounding."""
    from benchmarks.bench_train import model_config
    from vlm_core.data.packing import pack
    from vlm_core.model.vlm import VLM
    from vlm_core.types import TokenizedSample

    torch.manual_seed(0)
    cfg = replace(model_config("tiny"), layers=2)
    model = VLM(cfg, vocab_size=50, image_token_id=49)
    P = cfg.vision.num_patches
    g = torch.Generator().manual_seed(1)

    def sample(text: int, images: int) -> TokenizedSample:
        ids = torch.cat([torch.full((P * images,), 49), torch.randint(0, 40, (text,), generator=g)])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[-4:] = True
        groups = torch.cat([torch.arange(1, images + 1, dtype=torch.int32).repeat_interleave(P),
                            torch.zeros(text, dtype=torch.int32)])
        size = cfg.vision.image_size
        return TokenizedSample(ids, mask, groups, torch.randn(images, 3, size, size, generator=g))

    samples = [sample(7, 1), sample(12, 0), sample(5, 1), sample(9, 1)]
    results = []
    for pad_rows in (True, False):
        batch = pack(samples, 2 * P + 15, pad_rows=pad_rows)
        model.zero_grad()
        out = lm_loss(model, batch, per_sample=True)
        out.loss_sum.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((batch.total, out, grads))
    (padded_total, padded, padded_grads), (flat_total, flat, flat_grads) = results
    assert flat_total == sum(len(s.input_ids) for s in samples) < padded_total
    assert flat.units == padded.units
    torch.testing.assert_close(flat.loss_sum, padded.loss_sum)
    assert flat_grads.keys() == padded_grads.keys()
    for name, grad in flat_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], msg=lambda m, name=name: f"{name}: {m}")
