"""The backward kernels of packed attention: delta, dK/dV over query tiles, dQ over key tiles.

Plain functions like the forward in packed_attention_kernels.py, whose ``_kernels`` decorates them
on first use into the same private namespace, where they find the shared helpers (_load_tile,
_store_tile, _visit_range, _dot, _cast) imported below. Atomic-free by default: dK, dV are
summed over the query heads of a KV head in registers, and dQ has a kernel of its own. With
ATOMIC_DQ the dK/dV kernel also adds dQ up with float32 atomics, FlashAttention-2's way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlm_core.kernels.packed_attention_kernels import _load_tile, _store_tile, _visit_range
from vlm_core.kernels.triton_runtime import _cast, _dot

if TYPE_CHECKING:
    import triton.language as tl  # noqa: TC004  (the kernels get the real module from make_jit)


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
    seg_start, kv_end, lo, hi, first_full, end_full, count = _visit_range(
        SegStart, KvEnd, offs_m, total, BLOCK_N
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
    # Queries to visit: key j is seen exactly by [q_start[j], seg_end[j]). The mirror image of
    # the forward's key range; queries of other segments are never visited.
    q_start, seg_end, lo, hi, first_full, end_full, count = _visit_range(
        QStart, SegEnd, offs_n, total, BLOCK_M
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
