"""Packed attention through PyTorch's own attention ops: the peers of the Triton kernel.

Each function has the signature and the mask of
:func:`vlm_core.kernels.attention_reference.packed_attention_reference` (token i attends to j iff they
share a segment of ``cu_seqlens`` and j <= i or ``bidir_group[i] == bidir_group[j] != 0``), and assumes
the input checks of :func:`vlm_core.kernels.packed_attention` have passed. Shapes, as in flash-attn's
``flash_attn_varlen_func``:

    q: (total, Hq, Dh); k, v: (total, Hkv, Dh), Hq % Hkv == 0; cu_seqlens: (n + 1,) int32,
    cu_seqlens[0] == 0, cu_seqlens[-1] == total; bidir_group: (total,) int32 or None.
    Returns (total, Hq, Dh) in q's dtype.

- ``packed_attention_sdpa``: ``F.scaled_dot_product_attention`` with a dense boolean mask. Any device
  and float dtype, forward and backward.
- ``packed_attention_flex``: FlexAttention with a ``mask_mod`` of the same rule; compiled on CUDA,
  eager elsewhere. PyTorch has no FlexAttention backward on the CPU, so there it is forward only.
- ``packed_attention_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside
  PyTorch). CUDA, fp16/bf16, causal-only masks (no image spans).
- ``packed_attention_flash_attn``: ``flash_attn.flash_attn_varlen_func`` from the flash-attn package,
  when installed. CUDA, fp16/bf16, causal-only masks.

Each raises ValueError (inputs it cannot take) or RuntimeError (missing device or package) with the
reason and the impl to use instead. Tested against the reference in
tests/vlm_core/kernels/test_attention_torch.py (sdpa and flex forward on the CPU; the CUDA-only paths
there are skipped without a GPU).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vlm_core.kernels.attention_reference import (
    _segment_layout,
    packed_attention_mask,
    segment_ids,
)
from vlm_core.kernels.packing_memo import LastPacking

_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------- SDPA


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[..., Hkv, S, Dh] -> [..., Hkv * group, S, Dh]; query head h reads KV head h // group.

    SDPA's ``enable_gqa`` is served only by its flash and math backends, and flash takes no mask, so
    a masked GQA call would land on the math backend; repeating the heads keeps the memory-efficient
    backend (which takes a mask) eligible on CUDA, at the cost of a [total, Hq, Dh] copy of k and v.
    """
    if group == 1:
        return x
    return x.repeat_interleave(group, dim=-3)


def _sdpa_padded(q, k, v, cu_seqlens, max_seqlen, bidir_group, scale):
    """Segments gathered into a padded batch [n, H, L, Dh] with an [n, 1, L, L] mask."""
    total, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[1]
    L = max_seqlen
    index, valid = _segment_layout(cu_seqlens, L, total)  # [n, L], [n, L] with n segments
    q_padded = q[index].transpose(1, 2)  # [n, Hq, L, Dh]
    k_padded = _repeat_kv(k[index].transpose(1, 2), group)  # [n, Hq, L, Dh]
    v_padded = _repeat_kv(v[index].transpose(1, 2), group)  # [n, Hq, L, Dh]
    positions = torch.arange(L, device=q.device)
    allowed = (positions[None, :] <= positions[:, None])[None]  # [1, L, L], causal
    if bidir_group is not None:
        groups = bidir_group[index]  # [n, L]
        allowed = allowed | ((groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] != 0))  # [n, L, L]
    allowed = allowed & valid[:, None, :]  # keys must be real tokens
    allowed = allowed | ~valid[:, :, None]  # padding query rows see everything: no all-masked (NaN) row
    out = F.scaled_dot_product_attention(q_padded, k_padded, v_padded, attn_mask=allowed[:, None], scale=scale)
    out = out.transpose(1, 2)  # [n, L, Hq, Dh]
    return out[valid]  # [total, Hq, Dh], rows in packed order (see _segment_layout)


def _sdpa_dense(q, k, v, cu_seqlens, bidir_group, scale):
    """The whole packed row as one sequence [1, H, total, Dh] with the block-diagonal [total, total] mask."""
    total, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[1]
    mask = packed_attention_mask(cu_seqlens, bidir_group, total)  # [total, total]
    q_row = q.transpose(0, 1)[None]  # [1, Hq, total, Dh]
    k_row = _repeat_kv(k.transpose(0, 1)[None], group)  # [1, Hq, total, Dh]
    v_row = _repeat_kv(v.transpose(0, 1)[None], group)  # [1, Hq, total, Dh]
    out = F.scaled_dot_product_attention(q_row, k_row, v_row, attn_mask=mask, scale=scale)  # [1, Hq, total, Dh]
    return out[0].transpose(0, 1)  # [total, Hq, Dh]


def packed_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    bidir_group: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Packed attention by ``F.scaled_dot_product_attention`` with an explicit boolean mask.

    Two layouts give the same result; the one with fewer score entries is used:
    - padded: each segment becomes a batch entry of length max_seqlen, n * max_seqlen^2 scores;
    - dense: the packed row is one sequence with the block-diagonal mask, total^2 scores (better
      when one long segment sits among many short ones).
    Either way the mask is dense, so memory is O(Hq * scores): a peer for benchmarks and a fallback
    on CUDA, not a long-context kernel. Any device, any float dtype (SDPA computes in that dtype),
    forward and backward. On CUDA a boolean mask rules out SDPA's flash backend; the
    memory-efficient backend serves it.
    """
    total = q.shape[0]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    n = cu_seqlens.numel() - 1
    if n * max_seqlen * max_seqlen <= total * total:
        return _sdpa_padded(q, k, v, cu_seqlens, max_seqlen, bidir_group, scale)
    return _sdpa_dense(q, k, v, cu_seqlens, bidir_group, scale)


# ---------------------------------------------------------------------------------------------------- Flex


def packed_attention_mask_mod(cu_seqlens: torch.Tensor, bidir_group: torch.Tensor | None, total: int) -> Callable:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of the packed-batch contract.

    ``document[t]`` is the segment of token t (from cu_seqlens); the rule is
    document[q] == document[kv] and (kv <= q or group[q] == group[kv] != 0).
    """
    document = segment_ids(cu_seqlens, total, dtype=torch.int32)  # [total]

    if bidir_group is None:

        def causal_documents(b, h, q_idx, kv_idx):
            return (document[q_idx] == document[kv_idx]) & (kv_idx <= q_idx)

        return causal_documents

    def causal_documents_bidirectional_images(b, h, q_idx, kv_idx):
        same_image = (bidir_group[q_idx] == bidir_group[kv_idx]) & (bidir_group[q_idx] != 0)
        return (document[q_idx] == document[kv_idx]) & ((kv_idx <= q_idx) | same_image)

    return causal_documents_bidirectional_images


_COMPILED: dict[str, Callable] = {}  # "flex_attention" / "create_block_mask" -> torch.compile'd function


def _compiled(name: str) -> Callable:
    """torch.compile of a FlexAttention function, built on first use and shared by every call."""
    if name not in _COMPILED:
        from torch.nn.attention import flex_attention as flex

        _COMPILED[name] = torch.compile(getattr(flex, name))
    return _COMPILED[name]


def build_flex_block_mask(cu_seqlens: torch.Tensor, bidir_group: torch.Tensor | None, total: int) -> Any:
    """The FlexAttention BlockMask of a packed batch ([1, 1, total, total], heads broadcast).

    On CUDA ``create_block_mask`` is compiled, so the [total, total] mask is never materialized
    (eager it would be: 1 GiB of bool at total = 32k); elsewhere it runs eagerly.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = packed_attention_mask_mod(cu_seqlens, bidir_group, total)
    create = _compiled("create_block_mask") if cu_seqlens.is_cuda else create_block_mask
    return create(mask_mod, 1, None, total, total, device=cu_seqlens.device)


_last_block_mask: LastPacking[Any] = LastPacking()  # the layers of one forward pass build it once


def flex_attention_packed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, softmax_scale: float | None = None
) -> torch.Tensor:
    """FlexAttention on packed q (total, Hq, Dh), k, v (total, Hkv, Dh) with a prebuilt block mask.

    Compiled on CUDA (one compiled function for the process; a new ``total`` recompiles once, then
    dynamic shapes take over), eager elsewhere: the eager path materializes the scores and is for
    correctness tests only. Returns (total, Hq, Dh).
    """
    from torch.nn.attention import flex_attention as flex

    if q.device.type == "cpu":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError(
                "packed_attention impl=flex: PyTorch's FlexAttention has no backward pass on the CPU (forward only); "
                "use impl=sdpa or impl=reference to train on the CPU, or run impl=flex on CUDA"
            )
        q, k, v = q.detach(), k.detach(), v.detach()  # flex refuses CPU inputs that require grad, even under no_grad
    enable_gqa = q.shape[1] != k.shape[1]
    q_row, k_row, v_row = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, total, Dh]
    if q.is_cuda:
        out = _compiled("flex_attention")(q_row, k_row, v_row, block_mask=block_mask, scale=softmax_scale, enable_gqa=enable_gqa)
    else:
        with warnings.catch_warnings():
            # Eager use is deliberate off CUDA; the warning recommends torch.compile.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex.flex_attention(q_row, k_row, v_row, block_mask=block_mask, scale=softmax_scale, enable_gqa=enable_gqa)
    return out[0].transpose(0, 1)  # [total, Hq, Dh]


def packed_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    bidir_group: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Packed attention by FlexAttention with the contract's ``mask_mod`` (see packed_attention_mask_mod).

    The whole packed row is one sequence [1, H, total, Dh]; the block mask skips the 128x128 tiles
    outside every segment. The block mask of the last cu_seqlens/bidir_group pair is reused, so the
    layers of a model build it once per batch. GQA through ``enable_gqa``.

    Limits: CUDA (compiled, forward and backward; dtypes and head dims as FlexAttention's Triton
    templates take them), or CPU eager forward only (RuntimeError if an input requires grad).
    """
    total = q.shape[0]
    block_mask = _last_block_mask.get(
        cu_seqlens, bidir_group, (total,), lambda: build_flex_block_mask(cu_seqlens, bidir_group, total)
    )
    return flex_attention_packed(q, k, v, block_mask, softmax_scale)


# --------------------------------------------------------------------- causal-only FlashAttention paths


def _require_causal_flash_inputs(impl: str, q: torch.Tensor, bidir_group: torch.Tensor | None) -> None:
    """Raise unless a causal FlashAttention-2 kernel can serve these inputs."""
    if bidir_group is not None:
        image_tokens = int((bidir_group != 0).sum())  # one device sync
        if image_tokens:
            raise ValueError(
                f"packed_attention impl={impl}: the batch has {image_tokens} image tokens in bidirectional spans "
                f"(bidir_group != 0), but {impl} only computes causal masks; use impl=triton, flex, sdpa or reference "
                "for batches with images"
            )
    if not q.is_cuda:
        raise RuntimeError(f"packed_attention impl={impl}: FlashAttention runs on CUDA only, got q on {q.device}")
    if q.dtype not in _HALF_DTYPES:
        raise ValueError(
            f"packed_attention impl={impl}: q.dtype={q.dtype}; FlashAttention takes float16 or bfloat16 "
            "(cast q, k, v, e.g. under torch.autocast)"
        )
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > 256:
        raise ValueError(f"packed_attention impl={impl}: head_dim={head_dim}; FlashAttention-2 takes multiples of 8 up to 256")


def packed_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    bidir_group: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal packed attention by ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 in PyTorch).

    Limits: CUDA, float16/bfloat16, Dh a multiple of 8 up to 256, and a causal-only mask:
    ``bidir_group`` None or all zero (ValueError otherwise). GQA natively (``enable_gqa``).
    Causality is ``window_size=(-1, 0)``, varlen_attn's spelling of is_causal.
    """
    _require_causal_flash_inputs("varlen", q, bidir_group)
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        scale=softmax_scale, **varlen_causal_keywords(varlen_attn, gqa=q.shape[1] != k.shape[1]),
    )


def varlen_causal_keywords(varlen_attn, gqa: bool) -> dict:
    """The keywords that make this torch's ``varlen_attn`` causal (and GQA), read from its signature.

    Its keywords changed between releases: torch 2.10 spelled causality ``is_causal=True``, later ones
    ``window_size=(-1, 0)``; ``enable_gqa`` appeared later still (2.13 has it, not every earlier window_size
    release does). Without ``enable_gqa``, fewer KV heads go in as they are: FlashAttention-2 serves GQA by
    itself when Hkv divides Hq. The GPU benchmark machine has torch 2.11, the CI machine 2.13.
    """
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        keywords = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        keywords = {"is_causal": True}
    else:
        raise RuntimeError(
            f"torch {torch.__version__}: varlen_attn takes neither window_size nor is_causal "
            f"(parameters: {', '.join(params)}); cannot ask it for a causal mask"
        )
    if gqa and "enable_gqa" in params:
        keywords["enable_gqa"] = True
    return keywords


def packed_attention_flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    bidir_group: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal packed attention by the flash-attn package's ``flash_attn_varlen_func`` (FlashAttention-2).

    Limits as :func:`packed_attention_varlen`, plus the package must be installed (RuntimeError if not).
    """
    _require_causal_flash_inputs("flash_attn", q, bidir_group)
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        raise RuntimeError(
            f"packed_attention impl=flash_attn: the flash-attn package is not importable ({error}); "
            "pip install flash-attn, or use impl=varlen (the same kernel inside PyTorch)"
        ) from error
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
        dropout_p=0.0, softmax_scale=softmax_scale, causal=True,
    )


__all__ = [
    "build_flex_block_mask",
    "flex_attention_packed",
    "packed_attention_flash_attn",
    "packed_attention_flex",
    "packed_attention_mask_mod",
    "packed_attention_sdpa",
    "packed_attention_varlen",
]
