"""Packed (varlen) attention in plain PyTorch: the specification every faster kernel is tested against.

The mask is the packed-batch contract of DESIGN.md: token i may attend to token j iff both lie in the
same segment of ``cu_seqlens`` and either j <= i (causal text) or ``bidir_group[i] == bidir_group[j] != 0``
(all tokens of one image see each other).

Input validation lives in :func:`vlm_core.kernels.packed_attention`; these functions assume valid input.
"""

from __future__ import annotations

import math

import torch


def _segment_layout(cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index map from a padded ``[n, max_seqlen]`` grid to packed rows.

    Returns ``index`` ``[n, L]`` int64 (packed row of each grid slot, clamped to a valid row on
    padding slots) and ``valid`` ``[n, L]`` bool (slot holds a real token), with L = max_seqlen.
    ``packed[index][valid]`` lists the packed rows in their original order, because segments are
    contiguous and sorted: row-major order of the grid is token order.
    """
    starts = cu_seqlens[:-1].long()  # [n]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [n]
    offsets = torch.arange(max_seqlen, device=cu_seqlens.device)  # [L]
    valid = offsets[None, :] < lengths[:, None]  # [n, L]
    index = (starts[:, None] + offsets[None, :]).clamp(max=total - 1)  # [n, L]
    return index, valid


def segment_ids(
    cu_seqlens: torch.Tensor, total: int | None = None, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """The segment (document) id of every packed token, ``[total]``: token t lies in segment
    ``segment_ids[t]`` of ``cu_seqlens``. Passing ``total`` spares ``repeat_interleave`` its
    device sync (it then trusts ``cu_seqlens[-1] == total``)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [n]
    documents = torch.arange(lengths.numel(), dtype=dtype, device=cu_seqlens.device)  # [n]
    return torch.repeat_interleave(documents, lengths, output_size=total)  # [total]


def packed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    bidir_group: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed segments with causal text and bidirectional image spans.

    Same contract as :func:`vlm_core.kernels.packed_attention` (arguments, mask rule, returns), of
    which this is the specification. Scores, softmax and the weighted sum run in float32 (float64
    stays float64); segments are padded to ``max_seqlen`` internally. Differentiable through autograd.

    Limits: any float dtype, any device, any Dh. Memory is O(n * Hq * max_seqlen^2) for the score
    tensor, so this is meant for CPU training of small models and for tests, not for long sequences.
    Every token may attend to itself, so no row of the softmax is empty and the output has no NaN.
    Tested against a float64 dense-mask softmax in tests/vlm_core/kernels/test_packed_attention.py.
    """
    total, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads  # G: query heads per KV head
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    n = cu_seqlens.numel() - 1
    L = max_seqlen

    index, valid = _segment_layout(cu_seqlens, L, total)  # [n, L], [n, L]

    # Gather segments into a padded batch; one batched attention replaces a loop over segments.
    q_padded = q[index].to(compute_dtype)  # [n, L, Hq, Dh]
    k_padded = k[index].to(compute_dtype)  # [n, L, Hkv, Dh]
    v_padded = v[index].to(compute_dtype)  # [n, L, Hkv, Dh]
    q_padded = q_padded.view(n, L, num_kv_heads, group, head_dim)  # [n, L, Hkv, G, Dh]

    scores = torch.einsum("nihgd,njhd->nhgij", q_padded, k_padded) * scale  # [n, Hkv, G, L, L]

    positions = torch.arange(L, device=q.device)
    causal = positions[None, :] <= positions[:, None]  # [L, L], [i, j] = j <= i
    allowed = causal[None]  # [1, L, L]
    if bidir_group is not None:
        groups = bidir_group[index]  # [n, L]
        same_image = (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] != 0)  # [n, L, L]
        allowed = allowed | same_image
    allowed = allowed & valid[:, None, :]  # keys must be real tokens of the segment
    # Padding query slots attend to everything: their rows are dropped below, and a row with no
    # allowed key would be NaN, which autograd would carry into the gradients as NaN * 0.
    allowed = allowed | ~valid[:, :, None]  # [n, L, L]

    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [n, Hkv, G, L, L]
    out = torch.einsum("nhgij,njhd->nihgd", probs, v_padded)  # [n, L, Hkv, G, Dh]
    out = out.reshape(n, L, num_q_heads, head_dim)  # [n, L, Hq, Dh]
    return out[valid].to(q.dtype)  # [total, Hq, Dh], rows back in packed order


def packed_attention_mask(
    cu_seqlens: torch.Tensor, bidir_group: torch.Tensor | None, total: int
) -> torch.Tensor:
    """The dense boolean mask of the packed-batch contract.

    cu_seqlens: (n + 1,) int32 with cu_seqlens[-1] == total; bidir_group: (total,) int32 or None.
    Returns (total, total) bool, ``mask[i, j]`` = token i may attend to token j. O(total^2) memory:
    for tests and for dense kernels (SDPA with an explicit mask), not for long batches.
    """
    segment = segment_ids(cu_seqlens)  # [total]
    if segment.numel() != total:
        raise ValueError(f"cu_seqlens covers {segment.numel()} tokens, but total={total}")
    positions = torch.arange(total, device=cu_seqlens.device)
    same_segment = segment[:, None] == segment[None, :]  # [total, total]
    allowed = positions[None, :] <= positions[:, None]  # [total, total], causal
    if bidir_group is not None:
        allowed = allowed | ((bidir_group[:, None] == bidir_group[None, :]) & (bidir_group[:, None] != 0))
    return same_segment & allowed
