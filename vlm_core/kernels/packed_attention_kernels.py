"""The @triton.jit kernels of packed attention (forward, and the three backward kernels), compiled on first use.

Flash-attention style: an online softmax that never materialises the [total, total] scores, the
row logsumexp saved for the backward pass, and a backward made of three kernels (delta =
rowsum(dO * O), then dK/dV over query tiles, then dQ over key tiles), all atomic-free; or, with
ATOMIC_DQ, two, the dK/dV kernel adding dQ up with float32 atomics (FlashAttention-2's way). Each
program reads the per-token windows of packed_attention_windows.py to visit only the tiles its
rows (or columns) can see, and to skip the element mask on tiles inside every window.

The kernels are plain functions here; :func:`_kernels` decorates them with ``triton.jit`` (and
``triton.autotune``) on first use, so importing this module imports no triton. The launchers,
the autograd Function and the public op are in packed_attention_triton.py.
"""

from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING

import torch

# _dot and _cast are device helpers the kernels below call; make_jit decorates them with the kernels.
from vlm_core.kernels.triton_runtime import _cast, _dot, autotune_candidates, make_jit

if TYPE_CHECKING:
    # Importing triton here would fix interpreter-or-GPU for triton's own library (tl.max,
    # tl.sum, ...) before a test can set TRITON_INTERPRET=1, and would fail without triton.
    # The kernels get the real module as a global in _kernels().
    import triton.language as tl  # noqa: TC004


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
        qk = _dot(q, tl.trans(k), None, DOT_PRECISION, INTERPRET_BF16)  # [M, N], unscaled
        # The scale (> 0) goes on the row maxima, and then into one FMA with the subtraction:
        # max(qk) * s is max(qk * s), and qk * s - m is a single fused op per score (as in
        # Triton's fused-attention tutorial) instead of a multiply and a subtract.
        if MASKED:
            allowed = (offs_n[None, :] >= seg_start[:, None]) & (
                offs_n[None, :] < kv_end[:, None]
            )
            qk = tl.where(allowed, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # A row may have no allowed key in this tile and none before it (a query of the
            # next segment in a tile that straddles two segments): subtract 0 instead of -inf,
            # so p = exp2(-inf) = 0 and alpha = 0 rather than exp2(-inf + inf) = NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
        p = tl.exp2(qk * qk_scale - m_use[:, None])
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
        qk = _dot(q, tl.trans(k), None, DOT_PRECISION, INTERPRET_BF16)
        log2_p = qk * qk_scale - lse[:, None]  # one FMA per score
        if MASKED:
            allowed = (offs_n[None, :] >= seg_start[:, None]) & (
                offs_n[None, :] < kv_end[:, None]
            )
            # Mask before exp2: a masked score may exceed lse, and exp2 would overflow.
            log2_p = tl.where(allowed, log2_p, float("-inf"))
        p = tl.exp2(log2_p)  # the forward's probabilities, recomputed
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
    dq_base,
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
    ATOMIC_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles (query tile t starts at lo + t*BLOCK_M).

    Works on transposed scores [N, M] so that dK = dS^T Q and dV = P^T dO need no transpose of
    the accumulators. With ATOMIC_DQ, also adds this key tile's share of dQ (dS K, unscaled) to
    the float32 rows at dq_base with atomics: five matrix products per tile pair instead of the
    seven that the separate dQ kernel's recomputation of QK^T and dP^T costs.
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
        log2_p_t = qk_t * qk_scale - lse[None, :]  # one FMA per score
        if MASKED:
            allowed = (offs_m[None, :] >= q_start[:, None]) & (
                offs_m[None, :] < seg_end[:, None]
            )
            log2_p_t = tl.where(allowed, log2_p_t, float("-inf"))  # before exp2, as in dQ
        p_t = tl.exp2(log2_p_t)
        dv = _dot(
            _cast(p_t, dout.dtype, INTERPRET_BF16),
            dout,
            dv,
            DOT_PRECISION,
            INTERPRET_BF16,
        )
        dp_t = _dot(v, tl.trans(dout), None, DOT_PRECISION, INTERPRET_BF16)  # [N, M]
        ds_t = _cast(p_t * (dp_t - delta[None, :]), q.dtype, INTERPRET_BF16)
        dk = _dot(ds_t, q, dk, DOT_PRECISION, INTERPRET_BF16)
        if ATOMIC_DQ:
            # dQ^T = K^T dS [D, M]: the head dim (64/128) is the product's row count, so
            # it runs on wgmma (64 rows at least); dQ = dS^T K would have BLOCK_M (16/32) rows.
            dq_t = _dot(tl.trans(k), ds_t, None, DOT_PRECISION, INTERPRET_BF16)  # [D, M]
            pointers = dq_base + offs_m[None, :] * stride_qt + offs_d[:, None]
            # Columns at or past hi are another segment's (or past the end): their dS is 0 here.
            tl.atomic_add(
                pointers,
                dq_t,
                mask=(offs_m[None, :] < hi) & (offs_d[:, None] < HEAD_DIM),
                sem="relaxed",
            )
    return dk, dv


def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    DK,
    DV,
    DQAcc,
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
    ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV for BLOCK_N keys of one KV head.

    GQA reduction without atomics: the program loops over the ``group`` query heads that share
    this KV head and sums their contributions in its float32 accumulators, so dK, dV are written
    once, deterministically. With ATOMIC_DQ it also adds dQ's shares into DQAcc (float32, laid
    out as Q, zeroed by the caller), in an order that varies from run to run.
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
        dq_base = DQAcc + head * stride_qh
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, dout_base, lse_base, delta_base, dq_base, stride_qt, offs_d,
            q_start, seg_end, lo, 0, first_full, hi, qk_scale,
            HEAD_DIM, BLOCK_M, PAD_D, True, ATOMIC_DQ, DOT_PRECISION, INTERPRET_BF16,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, dout_base, lse_base, delta_base, dq_base, stride_qt, offs_d,
            q_start, seg_end, lo, first_full, end_full, hi, qk_scale,
            HEAD_DIM, BLOCK_M, PAD_D, False, ATOMIC_DQ, DOT_PRECISION, INTERPRET_BF16,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, dout_base, lse_base, delta_base, dq_base, stride_qt, offs_d,
            q_start, seg_end, lo, end_full, count, hi, qk_scale,
            HEAD_DIM, BLOCK_M, PAD_D, True, ATOMIC_DQ, DOT_PRECISION, INTERPRET_BF16,
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
# (H100/H200); configs that do not fit in shared memory are skipped by the autotuner (one does not:
# dQ at 128x128, 8 warps, 3 stages needs 257 KiB for Dh > 64). Chosen by compiling for sm_90 and
# reading registers and spills (benchmarks/triton_compile.py -> benchmarks/results/triton_compile_sm90.md),
# not yet by timing on a GPU. For dK/dV, BLOCK_N is the key tile whose dK, dV accumulate in registers
# and BLOCK_M the query tile; that kernel spills with 4 warps. At Dh 96/128 most configs spill (255
# registers and a stack frame); the last entries of each list are there because they do not: forward
# (128, 64, 8, 2) and (64, 64, 8, 3), dK/dV (32, 64, 8, 2), (32, 128, 8, 2) and (16, 64, 8, 3).
# Triton 3.6, the GPU machine's, spills more in dK/dV: at Dh 96 every entry above spills there, at Dh 128
# all but (32, 64, 8, 2). The last entry, (32, 64, 8, 1), is spill-free at every head dim under 3.6 and
# 3.7.1; 16 warps (at most 128 registers a thread) spill everywhere (triton_compile_sm90_triton3.6.md).
_GPU_FWD_CONFIGS = (
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 4, 4),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 4),
    (128, 64, 8, 2),
    (64, 64, 8, 3),
)
_DQ_TOO_BIG_FOR_WIDE_HEADS = ((128, 128, 8, 3),)  # 257 KiB of shared memory at BLOCK_D 128; sm_90 has 227
_GPU_DKDV_CONFIGS = (
    (32, 128, 8, 3),
    (32, 64, 8, 3),
    (64, 128, 8, 2),
    (64, 128, 8, 3),
    (16, 128, 8, 3),
    (64, 64, 4, 3),
    (32, 128, 4, 3),
    (32, 64, 8, 2),
    (32, 128, 8, 2),
    (16, 64, 8, 3),
    (32, 64, 8, 1),
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

    def tuned(fn, half_configs, fp32_configs, too_big_for_wide_heads=(), key=_AUTOTUNE_KEY, reset=None):
        if interpret:
            return triton.autotune([config(*_INTERPRETER_CONFIG)], key=key)(jit(fn))

        def keep_for_dtype(configs, named_args, **kwargs):
            wanted = (
                fp32_configs if named_args["Q"].dtype == torch.float32 else half_configs
            )
            if kwargs.get("BLOCK_D", 0) > 64:
                wanted = [c for c in wanted if c not in too_big_for_wide_heads]
            return autotune_candidates([
                c
                for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                in wanted
            ])

        return triton.autotune(
            [config(*c) for c in dict.fromkeys(half_configs + fp32_configs)],
            key=key,
            prune_configs_by={"early_config_prune": keep_for_dtype},
            reset_to_zero=reset,  # an atomic accumulator: zeroed before each trial and after tuning
        )(jit(fn))

    return types.SimpleNamespace(
        forward=tuned(_fwd_kernel, _GPU_FWD_CONFIGS, _GPU_FWD_FP32_CONFIGS),
        preprocess=jit(_bwd_preprocess_kernel),
        dq=tuned(_bwd_dq_kernel, _GPU_FWD_CONFIGS, _GPU_FWD_FP32_CONFIGS, _DQ_TOO_BIG_FOR_WIDE_HEADS),
        # its own tile with and without the atomic dQ (a constexpr the key must tell apart)
        dkdv=tuned(_bwd_dkdv_kernel, _GPU_DKDV_CONFIGS, _GPU_DKDV_FP32_CONFIGS,
                   key=[*_AUTOTUNE_KEY, "ATOMIC_DQ"], reset=["DQAcc"]),  # fmt: skip
    )
