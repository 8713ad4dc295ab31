"""Kernels: each op has a plain-PyTorch reference (the specification) and faster implementations.

``packed_attention`` is the one entry point the model calls. It validates its inputs once and
dispatches through ``ATTENTION_IMPLS``; new implementations (sdpa, flex, triton) register there and
in ``vlm_core.model.config.ATTN_IMPLS`` (a test keeps the two in step).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from vlm_core.kernels.attention_reference import packed_attention_mask, packed_attention_reference

AttentionFn = Callable[..., torch.Tensor]

# name -> function with the signature of packed_attention_reference.
ATTENTION_IMPLS: dict[str, AttentionFn] = {
    "reference": packed_attention_reference,
}

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_packed_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    bidir_group: Optional[torch.Tensor],
    softmax_scale: Optional[float],
) -> None:
    """Raise ValueError on anything that breaks the contract of :func:`packed_attention`.

    The value checks on ``cu_seqlens`` read it on the host (one device sync per call).
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"packed_attention: {name} must be a 3-d tensor (total, heads, head_dim), got {shape}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"packed_attention: {name}.dtype={tensor.dtype}; expected one of {list(_FLOAT_DTYPES)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"packed_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(
            f"packed_attention: q, k, v, cu_seqlens are on different devices "
            f"({q.device}, {k.device}, {v.device}, {cu_seqlens.device})"
        )
    if k.shape != v.shape:
        raise ValueError(f"packed_attention: k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    total, num_q_heads, head_dim = q.shape
    if total < 1:
        raise ValueError("packed_attention: q has no tokens (total == 0)")
    if k.shape[0] != total:
        raise ValueError(f"packed_attention: k/v have {k.shape[0]} tokens but q has {total}")
    if k.shape[2] != head_dim:
        raise ValueError(f"packed_attention: k/v head_dim {k.shape[2]} differs from q head_dim {head_dim}")
    num_kv_heads = k.shape[1]
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"packed_attention: Hq={num_q_heads} query heads is not a multiple of Hkv={num_kv_heads} KV heads "
            "(grouped-query attention shares each KV head among Hq/Hkv query heads)"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"packed_attention: cu_seqlens must be 1-d int32 (n + 1,), got shape {tuple(cu_seqlens.shape)} "
            f"dtype {cu_seqlens.dtype}; build it with torch.tensor(..., dtype=torch.int32)"
        )
    if cu_seqlens.numel() < 2:
        raise ValueError(f"packed_attention: cu_seqlens needs at least 2 entries (one segment), got {cu_seqlens.numel()}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"packed_attention: cu_seqlens must start at 0 and end at total={total}, "
            f"got cu_seqlens[0]={bounds[0]}, cu_seqlens[-1]={bounds[-1]}"
        )
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if min(lengths) < 0:
        at = lengths.index(min(lengths))
        raise ValueError(f"packed_attention: cu_seqlens decreases at index {at} ({bounds[at]} -> {bounds[at + 1]})")
    if not isinstance(max_seqlen, int) or max_seqlen < max(lengths):
        raise ValueError(f"packed_attention: max_seqlen={max_seqlen!r} must be an int >= the longest segment ({max(lengths)})")
    if bidir_group is not None:
        if bidir_group.dim() != 1 or bidir_group.dtype != torch.int32 or bidir_group.numel() != total:
            raise ValueError(
                f"packed_attention: bidir_group must be 1-d int32 of length total={total}, "
                f"got shape {tuple(bidir_group.shape)} dtype {bidir_group.dtype}"
            )
        if bidir_group.device != q.device:
            raise ValueError(f"packed_attention: bidir_group is on {bidir_group.device}, q on {q.device}")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"packed_attention: softmax_scale={softmax_scale!r} must be positive (or None for 1/sqrt(Dh))")


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    bidir_group: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    impl: str = "reference",
) -> torch.Tensor:
    """Attention over a packed batch: causal text, bidirectional image spans, no cross-sample attention.

    Arguments:
        q: (total, Hq, Dh); k, v: (total, Hkv, Dh) with Hq % Hkv == 0, one float dtype, one device.
        cu_seqlens: (n + 1,) int32, cu_seqlens[0] == 0, cu_seqlens[-1] == total, non-decreasing.
        max_seqlen: int >= the longest segment.
        bidir_group: (total,) int32 or None. 0 marks text; equal non-zero ids in one segment attend
            to each other in both directions.
        softmax_scale: defaults to 1 / sqrt(Dh).
        impl: a key of ``ATTENTION_IMPLS``.
    Returns:
        (total, Hq, Dh) in q's dtype; differentiable.

    Token i attends to j iff they share a segment and (j <= i or bidir_group[i] == bidir_group[j] != 0).
    Every limit above raises ValueError here, before any implementation runs.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"packed_attention: unknown impl={impl!r}; available: {sorted(ATTENTION_IMPLS)}")
    _check_packed_attention_inputs(q, k, v, cu_seqlens, max_seqlen, bidir_group, softmax_scale)
    return ATTENTION_IMPLS[impl](q, k, v, cu_seqlens, max_seqlen, bidir_group=bidir_group, softmax_scale=softmax_scale)


__all__ = [
    "ATTENTION_IMPLS",
    "packed_attention",
    "packed_attention_mask",
    "packed_attention_reference",
]
