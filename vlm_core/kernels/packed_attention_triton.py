"""Packed multimodal attention as fused Triton kernels (forward and backward): launchers and the op.

Same contract as :func:`vlm_core.kernels.attention_reference.packed_attention_reference`: token i
attends to token j iff both lie in one segment of ``cu_seqlens`` and (j <= i or
``bidir_group[i] == bidir_group[j] != 0``).

Layers, as in STYLE.md, across three modules:
- packed_attention_windows.py: which keys each query sees, as per-token [start, end) windows
  (:func:`packed_attention_windows`), the metadata the kernels skip tiles by;
- packed_attention_kernels.py: the private kernels (plain functions, turned into ``@triton.jit``
  kernels on first use by its ``_kernels``), the forward and the shared helpers there, the
  backward's in packed_attention_backward.py;
- here: the launchers (``_forward``, ``_backward``), an autograd Function, and the thin public
  :func:`packed_attention_triton`.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from vlm_core.kernels.packed_attention_kernels import _PREPROCESS_BLOCK_M, _kernels
from vlm_core.kernels.packed_attention_windows import (
    AttentionWindows,
    packed_attention_windows,
)
from vlm_core.kernels.packing_memo import LastPacking
from vlm_core.kernels.triton_runtime import check_can_run, check_dtype, size_bucket, triton_status
from vlm_core.kernels.triton_runtime import interpreting as _interpreting

_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 128
_LOG2_E = 1.4426950408889634  # scores are kept in log2 units, so the kernels use exp2
DQ_MODES = ("separate", "atomic")  # how the backward computes dq (packed_attention_triton's dq_mode)
DQ_MODE_ENV = "VLM_ATTN_DQ"
_last_windows: LastPacking[AttentionWindows] = LastPacking()  # the windows of the last batch seen


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _constexprs(q: torch.Tensor) -> dict:
    head_dim = q.shape[2]
    block_d = max(16, 1 << (head_dim - 1).bit_length())  # 96 -> 128, masked loads
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "PAD_D": block_d != head_dim,
        # float32 inputs: exact fp32 products ("ieee"), not TF32, to honour the reference;
        # half inputs run on tensor cores with float32 accumulation either way.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        # Work around the interpreter's bfloat16 arithmetic (see _dot and _cast).
        "INTERPRET_BF16": q.dtype == torch.bfloat16 and _interpreting(),
    }


def _seqlen_bucket(max_seqlen: int) -> int:
    """Autotune key: max_seqlen rounded up to a power of two (>= 64)."""
    return size_bucket(max_seqlen, 64)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: AttentionWindows,
    scale: float,
    max_seqlen: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [total, Hq, Dh] in q's dtype and lse [Hq, total] float32 (log2 units)."""
    import triton

    kernels = _kernels(_interpreting())
    total, num_q_heads, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((num_q_heads, total), dtype=torch.float32, device=q.device)

    def grid(meta):
        return (triton.cdiv(total, meta["BLOCK_M"]), num_q_heads)

    kernels.forward[grid](
        q, k, v, out, lse, windows.seg_start, windows.kv_end,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        total, num_q_heads // k.shape[1], scale * _LOG2_E, _seqlen_bucket(max_seqlen),
        **_constexprs(q),
    )  # fmt: skip
    return out, lse


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    windows: AttentionWindows,
    scale: float,
    max_seqlen: int,
    atomic_dq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv in the inputs' dtype; dk, dv summed over the query heads of each KV head. dq from its own
    kernel, or (atomic_dq) added up with atomics by the dK/dV kernel in a float32 buffer."""
    import triton

    kernels = _kernels(_interpreting())
    total, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[1]
    constexprs = _constexprs(q)
    bucket = _seqlen_bucket(max_seqlen)
    group = num_q_heads // num_kv_heads

    delta = torch.empty((num_q_heads, total), dtype=torch.float32, device=q.device)
    kernels.preprocess[(triton.cdiv(total, _PREPROCESS_BLOCK_M), num_q_heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        total, constexprs["HEAD_DIM"], constexprs["BLOCK_D"], constexprs["PAD_D"],
        _PREPROCESS_BLOCK_M,
    )  # fmt: skip

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    # float32, laid out as q (contiguous, so q's strides address it). Without atomics an unread placeholder of
    # its own (left unfilled: no kernel for it), never a live tensor: the autotuner zeroes this argument
    # before each trial.
    if atomic_dq:
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq_acc = torch.empty(1, dtype=torch.float32, device=q.device)

    def kv_grid(meta):
        return (triton.cdiv(total, meta["BLOCK_N"]), num_kv_heads)

    kernels.dkdv[kv_grid](
        q, k, v, dout, dk, dv, dq_acc, lse, delta, windows.q_start, windows.seg_end,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        total, group, scale * _LOG2_E, scale, bucket,
        **constexprs, ATOMIC_DQ=atomic_dq,
    )  # fmt: skip
    if atomic_dq:
        return dq_acc.mul_(scale).to(q.dtype), dk, dv

    dq = torch.empty_like(q)

    def q_grid(meta):
        return (triton.cdiv(total, meta["BLOCK_M"]), num_q_heads)

    kernels.dq[q_grid](
        q, k, v, dout, dq, lse, delta, windows.seg_start, windows.kv_end,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        total, group, scale * _LOG2_E, scale, bucket,
        **constexprs,
    )  # fmt: skip
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Autograd and the public function
# --------------------------------------------------------------------------------------------


class _PackedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg_start, kv_end, q_start, seg_end, max_seqlen, scale, atomic_dq):
        windows = AttentionWindows(seg_start, kv_end, q_start, seg_end)
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            out, lse = _forward(q, k, v, windows, scale, max_seqlen)
        ctx.save_for_backward(q, k, v, out, lse, *windows)
        ctx.max_seqlen = max_seqlen
        ctx.scale = scale
        ctx.atomic_dq = atomic_dq
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *windows = ctx.saved_tensors
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            dq, dk, dv = _backward(
                dout.contiguous(), q, k, v, out, lse, AttentionWindows(*windows),
                ctx.scale, ctx.max_seqlen, ctx.atomic_dq,
            )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None, None


def _check_kernel_limits(q: torch.Tensor, k: torch.Tensor) -> None:
    check_can_run("packed_attention_triton", q.device)
    check_dtype("packed_attention_triton", "q", q)
    head_dim = q.shape[2]
    if not (_MIN_HEAD_DIM <= head_dim <= _MAX_HEAD_DIM and head_dim % 8 == 0):
        raise ValueError(
            f"packed_attention_triton: head_dim={head_dim} is not supported; expected a "
            f"multiple of 8 in [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}] (e.g. 32, 64, 96, 128)"
        )
    # Offsets are 32-bit inside the kernels.
    if max(q.numel(), k.numel()) >= 2**31:
        raise ValueError(
            f"packed_attention_triton: q has {q.numel()} and k {k.numel()} elements; the kernel "
            "indexes with int32 offsets, so each must stay below 2**31 (split the batch)"
        )


def packed_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    bidir_group: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dq_mode: str | None = None,
) -> torch.Tensor:
    """Packed attention (causal text, bidirectional image spans) as fused Triton kernels.

    Same contract as :func:`vlm_core.kernels.packed_attention` (arguments, mask rule, returns);
    ``max_seqlen`` only picks the autotuning bucket here, and each image must be one contiguous
    span of a non-zero id inside its segment. The backward is Triton kernels too, with dk, dv
    summed over the query heads that share a KV head (no atomics; deterministic).

    ``dq_mode`` (default: the environment's VLM_ATTN_DQ, else "separate"): how the backward gets dq.
    "separate": a kernel of its own over the key tiles, which recomputes QK^T and dO V^T (seven
    matrix products per pair of tiles in the backward; deterministic). "atomic": the dK/dV kernel
    adds each key tile's share into a float32 buffer with atomics, as FlashAttention-2 does (five
    products; the summation order, so the last bits of dq, vary from run to run).

    Limits (each raises ValueError): float16, bfloat16 or float32 (float32 uses exact fp32 dot
    products, not TF32); Dh a multiple of 8 in [16, 128] (non-powers of two such as 96 are padded
    to the next power of two); an image id may not cover two separate runs of one segment;
    fewer than 2**31 elements in q and in k; softmax_scale > 0; dq_mode one of DQ_MODES; CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter; slow). Scores, softmax
    and accumulators are float32; P and dS are rounded to the input dtype before their matrix
    products, as in flash-attention.
    Inputs are assumed valid otherwise: call it through ``vlm_core.kernels.packed_attention``.
    Computing the windows syncs the host once per batch: the layers after the first reuse them
    (vlm_core/kernels/packing_memo.py).

    Tested in tests/vlm_core/kernels/test_packed_attention_triton.py against the reference:
    float32, bfloat16 and float16 with Dh 16, 24, 32, 64 in Triton 3.7's interpreter on the CPU,
    and compiled for sm_90 with Triton 3.7, every autotune config, by benchmarks/triton_compile.py
    (no GPU run). The GPU cases there (bf16/fp16, Dh 64/96/128, ~6k tokens) passed on an H100
    (triton 3.6.0) on 2026-11-24: benchmarks/results/gpu_session_h100_2026-11-24.md; the atomic
    dq came later and has run only in the interpreter and the sm_90 compile so far.
    """
    _check_kernel_limits(q, k)
    total, _, head_dim = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if not scale > 0:  # the forward scales row maxima, not scores: max(qk) * s = max(qk * s) needs s > 0
        raise ValueError(f"packed_attention_triton: softmax_scale={softmax_scale!r} must be positive")
    dq_mode = dq_mode or os.environ.get(DQ_MODE_ENV) or "separate"
    if dq_mode not in DQ_MODES:
        raise ValueError(f"packed_attention_triton: dq_mode={dq_mode!r} (or {DQ_MODE_ENV}); expected one of {DQ_MODES}")
    windows = batch_windows(cu_seqlens, bidir_group, total)
    return _PackedAttentionFunction.apply(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        *windows,
        max_seqlen,
        float(scale),
        dq_mode == "atomic",
    )


def batch_windows(cu_seqlens: torch.Tensor, bidir_group: torch.Tensor | None, total: int) -> AttentionWindows:
    """The attention windows of a packing, built (with their one host sync) at the first call for it and
    reused while the same unchanged tensors come back: a model's layers, or a model that asks for them before
    it queues its forward (vlm_core.kernels.prepare_packed_attention)."""
    return _last_windows.get(cu_seqlens, bidir_group, (total,),
                             lambda: packed_attention_windows(cu_seqlens, bidir_group, total))  # fmt: skip


def chosen_configs() -> dict[str, str]:
    """Kernel name -> the autotuned config it ran with at its last launch, as "BLOCK_MxBLOCK_N wWARPS sSTAGES"
    (kernels not launched yet are left out). Benchmarks record it beside their timings."""
    kernels = _kernels(_interpreting())
    chosen = {}
    for name in ("forward", "dkdv", "dq"):
        config = getattr(getattr(kernels, name), "best_config", None)
        if config is not None:
            blocks = config.kwargs
            chosen[name] = f"{blocks['BLOCK_M']}x{blocks['BLOCK_N']} w{config.num_warps} s{config.num_stages}"
    return chosen


__all__ = [
    "AttentionWindows",
    "chosen_configs",
    "packed_attention_triton",
    "packed_attention_windows",
    "triton_status",
]
