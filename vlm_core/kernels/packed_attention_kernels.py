"""The @triton.jit kernels of packed attention (the forward here, the backward's in packed_attention_backward.py),
compiled on first use.

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


def _visit_range(Start, End, offs, total, BLOCK: tl.constexpr):
    """The windows [Start[i], End[i]) of a program's tokens ``offs`` and the tiles it must visit.

    Returns (start, end, lo, hi, first_full, end_full, count). Tokens past ``total`` get the window
    [0, total): never empty, so no NaN; their results are not stored. [lo, hi) spans the real tokens'
    windows; the program visits the tiles [lo + t * BLOCK, lo + (t + 1) * BLOCK), t < count, and tiles
    [first_full, end_full) lie inside every window, [max start, min end), where every pair is allowed;
    the tiles before and after them need the element mask.
    """
    ok = offs < total
    start = tl.load(Start + offs, mask=ok, other=0)
    end = tl.load(End + offs, mask=ok, other=total)
    lo = tl.min(tl.where(ok, start, total), 0)
    hi = tl.max(tl.where(ok, end, 0), 0)
    full_lo = tl.max(start, 0)
    full_hi = tl.min(end, 0)
    count = (hi - lo + BLOCK - 1) // BLOCK
    first_full = tl.minimum((tl.maximum(full_lo - lo, 0) + BLOCK - 1) // BLOCK, count)
    end_full = tl.minimum(tl.maximum(full_hi - lo, 0) // BLOCK, count)
    end_full = tl.maximum(end_full, first_full)
    return start, end, lo, hi, first_full, end_full, count


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
    # Keys to visit: from the earliest segment start to the latest window end of the tile's
    # real rows. Every key in that range is allowed for at least one row of the tile (each row
    # sees its whole segment up to itself, and its own image span beyond), so no tile visited
    # is fully masked, and tiles of other segments are never visited.
    seg_start, kv_end, lo, hi, first_full, end_full, count = _visit_range(
        SegStart, KvEnd, offs_m, total, BLOCK_N
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
    tl.store(LSE + head * total + offs_m, m_i + tl.log2(l_i), mask=offs_m < total)


# --------------------------------------------------------------------------------------------
# Compilation on first use
# --------------------------------------------------------------------------------------------

_HELPERS = (_load_tile, _store_tile, _visit_range, _fwd_inner)

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

    # the backward kernels import this module's helpers, so they are imported here, not at the top
    from vlm_core.kernels import packed_attention_backward as bwd

    _, jit = make_jit(__name__)  # also decorates the shared _dot and _cast
    for helper in (*_HELPERS, bwd._bwd_dq_inner, bwd._bwd_dkdv_inner):
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
        preprocess=jit(bwd._bwd_preprocess_kernel),
        dq=tuned(bwd._bwd_dq_kernel, _GPU_FWD_CONFIGS, _GPU_FWD_FP32_CONFIGS, _DQ_TOO_BIG_FOR_WIDE_HEADS),
        # its own tile with and without the atomic dQ (a constexpr the key must tell apart)
        dkdv=tuned(bwd._bwd_dkdv_kernel, _GPU_DKDV_CONFIGS, _GPU_DKDV_FP32_CONFIGS,
                   key=[*_AUTOTUNE_KEY, "ATOMIC_DQ"], reset=["DQAcc"]),  # fmt: skip
    )
