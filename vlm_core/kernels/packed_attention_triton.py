"""Packed multimodal attention as fused Triton kernels (forward and backward).

Same contract as :func:`vlm_core.kernels.attention_reference.packed_attention_reference`: token i
attends to token j iff both lie in one segment of ``cu_seqlens`` and (j <= i or
``bidir_group[i] == bidir_group[j] != 0``). Flash-attention style: an online softmax that never
materialises the [total, total] scores, the row logsumexp saved for the backward pass, and a
backward made of three kernels (delta = rowsum(dO * O), then dK/dV over query tiles, then dQ over
key tiles), all atomic-free.

Layers, as in STYLE.md: private kernels (plain functions, turned into ``@triton.jit`` kernels on
first use by :func:`_kernels`), launchers (``_forward``, ``_backward``), an autograd Function, and
the thin public :func:`packed_attention_triton`.

Which keys a query sees is a window. Image spans are contiguous runs of one non-zero id inside a
segment, so token i sees exactly the keys j in ``[seg_start[i], kv_end[i])``: the segment start,
up to ``kv_end[i] = max(i + 1, end of i's image span)``. (Every key before i in the segment is
allowed by causality; a key after i is allowed only inside i's own span, which is contiguous.) By
the same argument key j is seen exactly by the queries in ``[q_start[j], seg_end[j])``, with
``q_start[j]`` = the start of j's image span (j itself for text). :func:`packed_attention_windows`
computes the four vectors with torch ops; the kernels read them per tile to decide which tiles to
visit at all and which need no per-element mask.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from typing import TYPE_CHECKING, NamedTuple

import torch

# _dot and _cast are device helpers the kernels below call; make_jit decorates them with the kernels.
from vlm_core.kernels.triton_runtime import _cast, _dot, make_jit, triton_status
from vlm_core.kernels.triton_runtime import interpreting as _interpreting

if TYPE_CHECKING:
    # Importing triton here would fix interpreter-or-GPU for triton's own library (tl.max,
    # tl.sum, ...) before a test can set TRITON_INTERPRET=1, and would fail without triton.
    # The kernels get the real module as a global in _kernels().
    import triton.language as tl  # noqa: TC004

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 128
_LOG2_E = 1.4426950408889634  # scores are kept in log2 units, so the kernels use exp2


# --------------------------------------------------------------------------------------------
# Block-skip metadata (torch ops on the tensors' device; no Python loop over tokens)
# --------------------------------------------------------------------------------------------


class AttentionWindows(NamedTuple):
    """Per-token attention windows of a packed batch, each ``[total]`` int32.

    Query i sees keys ``[seg_start[i], kv_end[i])``; key j is seen by queries
    ``[q_start[j], seg_end[j])``. Both describe the same mask as ``packed_attention_mask``.
    """

    seg_start: torch.Tensor  # first token of i's segment
    kv_end: torch.Tensor  # max(i + 1, end of i's image span), exclusive
    q_start: torch.Tensor  # start of j's image span, or j for text
    seg_end: torch.Tensor  # end of j's segment, exclusive


def packed_attention_windows(
    cu_seqlens: torch.Tensor, bidir_group: torch.Tensor | None, total: int
) -> AttentionWindows:
    """The [start, end) windows of the packed-attention mask (see the module docstring).

    cu_seqlens: (n + 1,) int32, valid as checked by ``vlm_core.kernels.packed_attention``.
    bidir_group: (total,) int32 or None. Each image (a non-zero id) must be one contiguous run of
        tokens inside its segment; an id that reappears later in the same segment after other
        tokens cannot be expressed as a window and raises ValueError. The check reads one bool on
        the host (one device sync). The same id in different segments is fine: those are
        different images, since attention never crosses segments.
    """
    device = cu_seqlens.device
    positions = torch.arange(total, device=device)  # [total] int64
    bounds = cu_seqlens.long()  # [n + 1]
    # Segment of each token: the number of segment ends at or before it. searchsorted with
    # right=True steps over empty segments (repeated bounds) correctly.
    segment = torch.searchsorted(bounds[1:], positions, right=True)  # [total]
    seg_start = bounds[segment]
    seg_end = bounds[segment + 1]
    if bidir_group is None:
        return AttentionWindows(
            seg_start.int(), (positions + 1).int(), positions.int(), seg_end.int()
        )

    groups = bidir_group.long()
    previous = torch.cat([groups[:1], groups[:-1]])
    # A run is a maximal stretch of equal ids inside one segment; an image span is a run of a
    # non-zero id. Runs break at segment starts, so equal ids in adjacent segments stay apart.
    run_begins = (positions == seg_start) | (groups != previous)  # [total] bool
    # Start of i's run: the latest run start at or before i. End of i's run: the earliest run
    # end at or after i (a reversed running minimum).
    run_start = torch.where(run_begins, positions, 0).cummax(0).values
    run_ends_here = torch.cat([run_begins[1:], run_begins.new_ones(1)])
    run_end = torch.where(run_ends_here, positions + 1, total).flip(0).cummin(0).values
    run_end = run_end.flip(0)
    image = groups != 0
    _check_images_contiguous(positions, segment, groups, image)
    kv_end = torch.where(image, run_end, positions + 1)
    q_start = torch.where(image, run_start, positions)
    return AttentionWindows(seg_start.int(), kv_end.int(), q_start.int(), seg_end.int())


def _check_images_contiguous(
    positions: torch.Tensor,
    segment: torch.Tensor,
    groups: torch.Tensor,
    image: torch.Tensor,
) -> None:
    """Raise ValueError if one (segment, image id) pair covers two separate runs of tokens."""
    # Sort image tokens by (segment, id); text tokens get unique negative keys. Each image is
    # contiguous iff neighbours with equal keys sit at consecutive positions.
    key = torch.where(image, (segment << 32) | (groups & 0xFFFFFFFF), -1 - positions)
    sorted_key, order = torch.sort(key, stable=True)
    sorted_positions = positions[order]
    split = (sorted_key[1:] == sorted_key[:-1]) & (
        sorted_positions[1:] - sorted_positions[:-1] != 1
    )
    if bool(split.any()):
        at = int(split.nonzero()[0, 0])
        before, after = int(sorted_positions[at]), int(sorted_positions[at + 1])
        raise ValueError(
            f"packed_attention_triton: bidir_group id {int(groups[after])} covers tokens "
            f"{before} and {after} of segment {int(segment[after])} but not all tokens "
            "between them; the Triton kernel needs each image to be one contiguous span. "
            "Give each image its own id (vlm_core.data.packing does), or use impl='reference'"
        )


# --------------------------------------------------------------------------------------------
# Kernels. Plain functions here; _kernels() compiles them with triton.jit on first use.
# --------------------------------------------------------------------------------------------


def _load_tile(
    base,
    rows,
    row_stride,
    cols,
    row_limit,
    HEAD_DIM: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
    CHECK_COLS: tl.constexpr,
):
    """base[rows[:, None] * row_stride + cols[None, :]]; entries outside the limits read 0."""
    pointers = base + rows[:, None] * row_stride + cols[None, :]
    if CHECK_ROWS and CHECK_COLS:
        mask = (rows[:, None] < row_limit) & (cols[None, :] < HEAD_DIM)
        tile = tl.load(pointers, mask=mask, other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(pointers, mask=rows[:, None] < row_limit, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(pointers, mask=cols[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(pointers)
    return tile


def _store_tile(
    base,
    rows,
    row_stride,
    cols,
    row_limit,
    value,
    HEAD_DIM: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    pointers = base + rows[:, None] * row_stride + cols[None, :]
    mask = (rows[:, None] < row_limit) & (cols[None, :] < HEAD_DIM)
    tl.store(pointers, _cast(value, base.dtype.element_ty, INTERPRET_BF16), mask=mask)


def _tile_iterations(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split the tiles [lo + t * BLOCK, lo + (t + 1) * BLOCK), t < cdiv(hi - lo, BLOCK).

    Returns (first_full, end_full, count): tiles [first_full, end_full) lie inside
    [full_lo, full_hi), where every (row, column) pair of the tile is allowed; the tiles before
    and after them need the element mask.
    """
    count = (hi - lo + BLOCK - 1) // BLOCK
    first_full = tl.minimum((tl.maximum(full_lo - lo, 0) + BLOCK - 1) // BLOCK, count)
    end_full = tl.minimum(tl.maximum(full_hi - lo, 0) // BLOCK, count)
    end_full = tl.maximum(end_full, first_full)
    return first_full, end_full, count


def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kt,
    offs_d,
    seg_start,
    kv_end,
    lo,
    first_tile,
    end_tile,
    hi,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAD_D: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    """Online softmax over key tiles [first_tile, end_tile); tile t starts at key lo + t * BLOCK_N."""
    for tile in range(first_tile, end_tile):
        offs_n = lo + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        # Loads stop at hi, the end of the keys this tile needs; unmasked tiles lie inside
        # every row's window, so they need no bounds check at all.
        k = _load_tile(k_base, offs_n, stride_kt, offs_d, hi, HEAD_DIM, MASKED, PAD_D)
        qk = _dot(q, tl.trans(k), None, DOT_PRECISION, INTERPRET_BF16)  # [M, N]
        qk = qk * qk_scale
        if MASKED:
            allowed = (offs_n[None, :] >= seg_start[:, None]) & (
                offs_n[None, :] < kv_end[:, None]
            )
            qk = tl.where(allowed, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row may have no allowed key in this tile and none before it (a query of the
            # next segment in a tile that straddles two segments): subtract 0 instead of -inf,
            # so p = exp2(-inf) = 0 and alpha = 0 rather than exp2(-inf + inf) = NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.exp2(qk - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, stride_kt, offs_d, hi, HEAD_DIM, MASKED, PAD_D)
        # P is rounded to the input dtype for the tensor-core product, as in flash-attention;
        # the accumulator stays float32.
        acc = _dot(
            _cast(p, v.dtype, INTERPRET_BF16),
            v,
            acc * alpha[:, None],
            DOT_PRECISION,
            INTERPRET_BF16,
        )
        m_i = m_new
    return acc, l_i, m_i


def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    SegStart,
    KvEnd,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ot,
    stride_oh,
    total,
    group,
    qk_scale,
    seqlen_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program = BLOCK_M packed query rows of one query head."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group  # GQA: query heads h*G .. h*G+G-1 read KV head h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < total
    # Rows past the end get the window [0, total): never empty, so no NaN; they are not stored.
    seg_start = tl.load(SegStart + offs_m, mask=row_ok, other=0)
    kv_end = tl.load(KvEnd + offs_m, mask=row_ok, other=total)
    # Keys to visit: from the earliest segment start to the latest window end of the tile's
    # real rows. Every key in that range is allowed for at least one row of the tile (each row
    # sees its whole segment up to itself, and its own image span beyond), so no tile visited
    # is fully masked, and tiles of other segments are never visited.
    lo = tl.min(tl.where(row_ok, seg_start, total), 0)
    hi = tl.max(tl.where(row_ok, kv_end, 0), 0)
    # Keys in [max seg_start, min kv_end) are allowed for every row: no element mask there.
    first_full, end_full, count = _tile_iterations(
        lo, hi, tl.max(seg_start, 0), tl.min(kv_end, 0), BLOCK_N
    )

    q = _load_tile(
        Q + head * stride_qh, offs_m, stride_qt, offs_d, total, HEAD_DIM, True, PAD_D
    )
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Earlier-segment keys of a tile that straddles a segment boundary (masked).
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, offs_d, seg_start, kv_end, lo,
        0, first_full, hi, qk_scale,
        HEAD_DIM, BLOCK_N, PAD_D, True, DOT_PRECISION, INTERPRET_BF16,
    )  # fmt: skip
    # Keys every row may see (unmasked).
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, offs_d, seg_start, kv_end, lo,
        first_full, end_full, hi, qk_scale,
        HEAD_DIM, BLOCK_N, PAD_D, False, DOT_PRECISION, INTERPRET_BF16,
    )  # fmt: skip
    # The causal diagonal and image spans reaching past it (masked).
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, offs_d, seg_start, kv_end, lo,
        end_full, count, hi, qk_scale,
        HEAD_DIM, BLOCK_N, PAD_D, True, DOT_PRECISION, INTERPRET_BF16,
    )  # fmt: skip

    # Every real row sees at least itself, so l_i > 0.
    out = acc / l_i[:, None]
    _store_tile(
        Out + head * stride_oh,
        offs_m,
        stride_ot,
        offs_d,
        total,
        out,
        HEAD_DIM,
        INTERPRET_BF16,
    )
    # logsumexp of the scaled scores, in log2 units: the backward recomputes
    # p = exp2(qk * qk_scale - lse) without a second pass over the keys.
    tl.store(LSE + head * total + offs_m, m_i + tl.log2(l_i), mask=row_ok)


def _bwd_preprocess_kernel(
    Out,
    DOut,
    Delta,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    total,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[h, i] = sum_d dO[i, h, d] * O[i, h, d], in float32."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    out = _load_tile(
        Out + head * stride_oh, offs_m, stride_ot, offs_d, total, HEAD_DIM, True, PAD_D
    )
    dout = _load_tile(
        DOut + head * stride_doh,
        offs_m,
        stride_dot,
        offs_d,
        total,
        HEAD_DIM,
        True,
        PAD_D,
    )
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    tl.store(Delta + head * total + offs_m, delta, mask=offs_m < total)


def _bwd_dq_inner(
    dq,
    q,
    dout,
    lse,
    delta,
    k_base,
    v_base,
    stride_kt,
    offs_d,
    seg_start,
    kv_end,
    lo,
    first_tile,
    end_tile,
    hi,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAD_D: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    for tile in range(first_tile, end_tile):
        offs_n = lo + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, stride_kt, offs_d, hi, HEAD_DIM, MASKED, PAD_D)
        v = _load_tile(v_base, offs_n, stride_kt, offs_d, hi, HEAD_DIM, MASKED, PAD_D)
        qk = _dot(q, tl.trans(k), None, DOT_PRECISION, INTERPRET_BF16) * qk_scale
        if MASKED:
            allowed = (offs_n[None, :] >= seg_start[:, None]) & (
                offs_n[None, :] < kv_end[:, None]
            )
            # Mask before exp2: a masked score may exceed lse, and exp2 would overflow.
            qk = tl.where(allowed, qk, float("-inf"))
        p = tl.exp2(qk - lse[:, None])  # the forward's probabilities, recomputed
        dp = _dot(dout, tl.trans(v), None, DOT_PRECISION, INTERPRET_BF16)
        ds = p * (dp - delta[:, None])  # d loss / d (scaled score)
        dq = _dot(
            _cast(ds, k.dtype, INTERPRET_BF16), k, dq, DOT_PRECISION, INTERPRET_BF16
        )
    return dq


def _bwd_dq_kernel(
    Q,
    K,
    V,
    DOut,
    DQ,
    LSE,
    Delta,
    SegStart,
    KvEnd,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    total,
    group,
    qk_scale,
    softmax_scale,
    seqlen_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ for BLOCK_M query rows of one head, visiting the same key tiles as the forward."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < total
    seg_start = tl.load(SegStart + offs_m, mask=row_ok, other=0)
    kv_end = tl.load(KvEnd + offs_m, mask=row_ok, other=total)
    lo = tl.min(tl.where(row_ok, seg_start, total), 0)
    hi = tl.max(tl.where(row_ok, kv_end, 0), 0)
    first_full, end_full, count = _tile_iterations(
        lo, hi, tl.max(seg_start, 0), tl.min(kv_end, 0), BLOCK_N
    )

    # q, dO are stored with the q strides (the launcher makes both contiguous).
    q = _load_tile(
        Q + head * stride_qh, offs_m, stride_qt, offs_d, total, HEAD_DIM, True, PAD_D
    )
    dout = _load_tile(
        DOut + head * stride_qh, offs_m, stride_qt, offs_d, total, HEAD_DIM, True, PAD_D
    )
    # Rows past the end read lse = delta = 0 with q = dO = 0: p = 1 and ds = 0, nothing stored.
    lse = tl.load(LSE + head * total + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + head * total + offs_m, mask=row_ok, other=0.0)
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_kh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _bwd_dq_inner(
        dq, q, dout, lse, delta, k_base, v_base, stride_kt, offs_d, seg_start, kv_end, lo,
        0, first_full, hi, qk_scale,
        HEAD_DIM, BLOCK_N, PAD_D, True, DOT_PRECISION, INTERPRET_BF16,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, dout, lse, delta, k_base, v_base, stride_kt, offs_d, seg_start, kv_end, lo,
        first_full, end_full, hi, qk_scale,
        HEAD_DIM, BLOCK_N, PAD_D, False, DOT_PRECISION, INTERPRET_BF16,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, dout, lse, delta, k_base, v_base, stride_kt, offs_d, seg_start, kv_end, lo,
        end_full, count, hi, qk_scale,
        HEAD_DIM, BLOCK_N, PAD_D, True, DOT_PRECISION, INTERPRET_BF16,
    )  # fmt: skip
    # score = softmax_scale * q.k, so dQ = softmax_scale * dS @ K.
    _store_tile(
        DQ + head * stride_qh,
        offs_m,
        stride_qt,
        offs_d,
        total,
        dq * softmax_scale,
        HEAD_DIM,
        INTERPRET_BF16,
    )


def _bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    dout_base,
    lse_base,
    delta_base,
    stride_qt,
    offs_d,
    q_start,
    seg_end,
    lo,
    first_tile,
    end_tile,
    hi,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PAD_D: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles (query tile t starts at lo + t*BLOCK_M).

    Works on transposed scores [N, M] so that dK = dS^T Q and dV = P^T dO need no transpose of
    the accumulators.
    """
    for tile in range(first_tile, end_tile):
        offs_m = lo + tile * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, offs_m, stride_qt, offs_d, hi, HEAD_DIM, MASKED, PAD_D)
        dout = _load_tile(
            dout_base, offs_m, stride_qt, offs_d, hi, HEAD_DIM, MASKED, PAD_D
        )
        if MASKED:
            # Rows at or past hi (the next segment, or past the end) read 0 and are masked.
            lse = tl.load(lse_base + offs_m, mask=offs_m < hi, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < hi, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        qk_t = _dot(k, tl.trans(q), None, DOT_PRECISION, INTERPRET_BF16)  # [N, M]
        qk_t = qk_t * qk_scale
        if MASKED:
            allowed = (offs_m[None, :] >= q_start[:, None]) & (
                offs_m[None, :] < seg_end[:, None]
            )
            qk_t = tl.where(allowed, qk_t, float("-inf"))  # before exp2, as in dQ
        p_t = tl.exp2(qk_t - lse[None, :])
        dv = _dot(
            _cast(p_t, dout.dtype, INTERPRET_BF16),
            dout,
            dv,
            DOT_PRECISION,
            INTERPRET_BF16,
        )
        dp_t = _dot(v, tl.trans(dout), None, DOT_PRECISION, INTERPRET_BF16)  # [N, M]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(
            _cast(ds_t, q.dtype, INTERPRET_BF16), q, dk, DOT_PRECISION, INTERPRET_BF16
        )
    return dk, dv


def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    DK,
    DV,
    LSE,
    Delta,
    QStart,
    SegEnd,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    total,
    group,
    qk_scale,
    softmax_scale,
    seqlen_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV for BLOCK_N keys of one KV head.

    GQA reduction without atomics: the program loops over the ``group`` query heads that share
    this KV head and sums their contributions in its float32 accumulators, so dK, dV are written
    once, deterministically.
    """
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < total
    # Keys past the end get the window [0, total) (never empty); their dK, dV are not stored.
    q_start = tl.load(QStart + offs_n, mask=col_ok, other=0)
    seg_end = tl.load(SegEnd + offs_n, mask=col_ok, other=total)
    # Queries to visit: key j is seen exactly by [q_start[j], seg_end[j]). The mirror image of
    # the forward's key range; queries of other segments are never visited.
    lo = tl.min(tl.where(col_ok, q_start, total), 0)
    hi = tl.max(tl.where(col_ok, seg_end, 0), 0)
    first_full, end_full, count = _tile_iterations(
        lo, hi, tl.max(q_start, 0), tl.min(seg_end, 0), BLOCK_M
    )

    k = _load_tile(
        K + kv_head * stride_kh, offs_n, stride_kt, offs_d, total, HEAD_DIM, True, PAD_D
    )
    v = _load_tile(
        V + kv_head * stride_kh, offs_n, stride_kt, offs_d, total, HEAD_DIM, True, PAD_D
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(group):
        head = kv_head * group + g
        q_base = Q + head * stride_qh
        dout_base = DOut + head * stride_qh
        lse_base = LSE + head * total
        delta_base = Delta + head * total
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, dout_base, lse_base, delta_base, stride_qt, offs_d,
            q_start, seg_end, lo, 0, first_full, hi, qk_scale,
            HEAD_DIM, BLOCK_M, PAD_D, True, DOT_PRECISION, INTERPRET_BF16,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, dout_base, lse_base, delta_base, stride_qt, offs_d,
            q_start, seg_end, lo, first_full, end_full, hi, qk_scale,
            HEAD_DIM, BLOCK_M, PAD_D, False, DOT_PRECISION, INTERPRET_BF16,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, dout_base, lse_base, delta_base, stride_qt, offs_d,
            q_start, seg_end, lo, end_full, count, hi, qk_scale,
            HEAD_DIM, BLOCK_M, PAD_D, True, DOT_PRECISION, INTERPRET_BF16,
        )  # fmt: skip
    _store_tile(
        DK + kv_head * stride_kh,
        offs_n,
        stride_kt,
        offs_d,
        total,
        dk * softmax_scale,
        HEAD_DIM,
        INTERPRET_BF16,
    )
    _store_tile(
        DV + kv_head * stride_kh,
        offs_n,
        stride_kt,
        offs_d,
        total,
        dv,
        HEAD_DIM,
        INTERPRET_BF16,
    )


# --------------------------------------------------------------------------------------------
# Compilation on first use
# --------------------------------------------------------------------------------------------

_HELPERS = (
    _load_tile,
    _store_tile,
    _tile_iterations,
    _fwd_inner,
    _bwd_dq_inner,
    _bwd_dkdv_inner,
)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by triton.autotune on a GPU, for Hopper
# (H100/H200); configs that do not fit in shared memory are skipped by the autotuner. Chosen by
# compiling for sm_90 with triton 3.6 and reading ptxas's register and spill counts, not yet by
# timing on a GPU. For dK/dV, BLOCK_N is the key tile whose dK, dV accumulate in registers and
# BLOCK_M the query tile; that kernel runs out of registers (a few hundred bytes of spills)
# unless it has 8 warps.
_GPU_FWD_CONFIGS = (
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 4, 4),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 4),
)
_GPU_DKDV_CONFIGS = (
    (32, 128, 8, 3),
    (32, 64, 8, 3),
    (64, 128, 8, 2),
    (64, 128, 8, 3),
    (16, 128, 8, 3),
    (64, 64, 4, 3),
    (32, 128, 4, 3),
)
# float32 on a GPU multiplies exactly ("ieee"), on CUDA cores, with every operand in registers:
# only small tiles stay (nearly) free of spills. A fallback for debugging, not a fast path.
_GPU_FWD_FP32_CONFIGS = ((32, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2))
_GPU_DKDV_FP32_CONFIGS = ((32, 32, 8, 2), (16, 32, 4, 2))
# The interpreter runs each program in numpy; autotuning there would only cost time. Small,
# unequal tiles make the CPU tests cross many tile and segment boundaries.
_INTERPRETER_CONFIG = (32, 16, 4, 1)
_PREPROCESS_BLOCK_M = 64
_AUTOTUNE_KEY = ["HEAD_DIM", "seqlen_bucket"]  # triton adds the tensors' dtypes


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    """The kernels compiled for one mode: the Triton interpreter, or the GPU.

    Triton fixes interpreter-or-GPU when a function is decorated (from TRITON_INTERPRET at that
    moment; for triton's own library, when triton is first imported). Decorating here, on first
    use, instead of at import lets this module be imported before a test sets TRITON_INTERPRET=1.
    Each mode gets its own copies of the functions with a private globals dict, because a
    kernel finds the helpers it calls through its globals.
    """
    import triton

    _, jit = make_jit(__name__)  # also decorates the shared _dot and _cast
    for helper in _HELPERS:
        jit(helper)

    def config(m, n, warps, stages):
        return triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages
        )

    def tuned(fn, half_configs, fp32_configs):
        if interpret:
            return triton.autotune([config(*_INTERPRETER_CONFIG)], key=_AUTOTUNE_KEY)(
                jit(fn)
            )

        def keep_for_dtype(configs, named_args, **kwargs):
            wanted = (
                fp32_configs if named_args["Q"].dtype == torch.float32 else half_configs
            )
            return [
                c
                for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                in wanted
            ]

        return triton.autotune(
            [config(*c) for c in dict.fromkeys(half_configs + fp32_configs)],
            key=_AUTOTUNE_KEY,
            prune_configs_by={"early_config_prune": keep_for_dtype},
        )(jit(fn))

    return types.SimpleNamespace(
        forward=tuned(_fwd_kernel, _GPU_FWD_CONFIGS, _GPU_FWD_FP32_CONFIGS),
        preprocess=jit(_bwd_preprocess_kernel),
        dq=tuned(_bwd_dq_kernel, _GPU_FWD_CONFIGS, _GPU_FWD_FP32_CONFIGS),
        dkdv=tuned(_bwd_dkdv_kernel, _GPU_DKDV_CONFIGS, _GPU_DKDV_FP32_CONFIGS),
    )


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
    return max(64, 1 << (max(max_seqlen, 1) - 1).bit_length())


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv in the inputs' dtype; dk, dv summed over the query heads of each KV head."""
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

    def kv_grid(meta):
        return (triton.cdiv(total, meta["BLOCK_N"]), num_kv_heads)

    kernels.dkdv[kv_grid](
        q, k, v, dout, dk, dv, lse, delta, windows.q_start, windows.seg_end,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        total, group, scale * _LOG2_E, scale, bucket,
        **constexprs,
    )  # fmt: skip

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
    def forward(ctx, q, k, v, seg_start, kv_end, q_start, seg_end, max_seqlen, scale):
        windows = AttentionWindows(seg_start, kv_end, q_start, seg_end)
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            out, lse = _forward(q, k, v, windows, scale, max_seqlen)
        ctx.save_for_backward(q, k, v, out, lse, *windows)
        ctx.max_seqlen = max_seqlen
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *windows = ctx.saved_tensors
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            dq, dk, dv = _backward(
                dout.contiguous(), q, k, v, out, lse, AttentionWindows(*windows),
                ctx.scale, ctx.max_seqlen,
            )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None


def _check_kernel_limits(q: torch.Tensor, k: torch.Tensor) -> None:
    ok, reason = triton_status(q.device)
    if not ok:
        raise ValueError(f"packed_attention_triton: cannot run on {q.device}: {reason}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"packed_attention_triton: dtype {q.dtype} is not supported; expected one of "
            f"{list(_SUPPORTED_DTYPES)} (use impl='reference' for float64)"
        )
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
) -> torch.Tensor:
    """Packed attention (causal text, bidirectional image spans) as fused Triton kernels.

    Same contract as :func:`vlm_core.kernels.packed_attention` (arguments, mask rule, returns);
    ``max_seqlen`` only picks the autotuning bucket here, and each image must be one contiguous
    span of a non-zero id inside its segment. The backward is Triton kernels too, with dk, dv
    summed over the query heads that share a KV head (no atomics; deterministic).

    Limits (each raises ValueError): float16, bfloat16 or float32 (float32 uses exact fp32 dot
    products, not TF32); Dh a multiple of 8 in [16, 128] (non-powers of two such as 96 are padded
    to the next power of two); an image id may not cover two separate runs of one segment;
    fewer than 2**31 elements in q and in k; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    (Triton's interpreter; slow). Scores, softmax and accumulators are float32; P and dS are
    rounded to the input dtype before their matrix products, as in flash-attention.
    Inputs are assumed valid otherwise: call it through ``vlm_core.kernels.packed_attention``.
    Computing the windows syncs the host once per call.

    Tested in tests/vlm_core/kernels/test_packed_attention_triton.py against the reference:
    float32, bfloat16 and float16 with Dh 16, 24, 32, 64 in Triton 3.7's interpreter on the CPU,
    and compiled for sm_90 with Triton 3.6 (no GPU run). The GPU cases there (bf16/fp16, Dh
    64/96/128, ~6k tokens) had not been run on a GPU when this was written.
    """
    _check_kernel_limits(q, k)
    total, _, head_dim = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    windows = packed_attention_windows(cu_seqlens, bidir_group, total)
    return _PackedAttentionFunction.apply(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        *windows,
        max_seqlen,
        float(scale),
    )


__all__ = [
    "AttentionWindows",
    "packed_attention_triton",
    "packed_attention_windows",
    "triton_status",
]
