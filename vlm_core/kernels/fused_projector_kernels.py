"""The Triton kernels of the fused projector (fused_projector.py), compiled on first use.

- :func:`_matmul_kernel`: one GEMM kernel for the op's six products, addressed through strides and index
  vectors (the gather of d embeds at the image rows, the scatter into the packed buffer), with the
  LayerNorm in its loads and the bias, GELU, GELU-gradient and column-sum epilogues;
- :func:`_column_sum_kernel`: a bias gradient's partial column sums over row splits;
- :func:`_layer_norm_stats_kernel`: per-row mean and 1/std for the LayerNorm in the loads; its backward is
  RMSNorm's row kernel in its LayerNorm mode (rmsnorm.py).

The kernels are plain functions here; :func:`_kernels` decorates them with ``triton.jit`` (and
``triton.autotune``) on first use, so importing this module imports no triton. The reference, the
launchers, the autograd Function and the public op are in fused_projector.py.
"""

from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING

from vlm_core.kernels.rmsnorm import _norm_bwd_kernel

# _cast and _dot are device helpers the kernels call; make_jit decorates them with them.
from vlm_core.kernels.triton_runtime import _cast, _dot, autotune_candidates, make_jit

if TYPE_CHECKING:
    import triton.language as tl  # noqa: TC004  (kernels get the real module as a global from make_jit)


# GEMM kinds (part of the autotuning key, so each gets its own tuned tile). _BWD_DW2_GELU is d W2 with GELU
# recomputed in its loads, for a backward that needs no d pre (fc1, the norm and the tower all frozen).
_FWD_GELU, _FWD_SCATTER, _BWD_DACT, _BWD_DW2, _BWD_DW1, _BWD_DX, _BWD_DW2_GELU = range(7)
# Epilogues.
_STORE, _BIAS_GELU, _GELU_GRAD = 0, 1, 2


def _gelu(x):
    """Exact (erf) GELU of float32 x, as F.gelu's default: x Phi(x)."""
    return x * _gelu_cdf(x)


def _gelu_cdf(x):
    """Phi(x) = 0.5 (1 + erf(x / sqrt 2)), the standard normal CDF."""
    # 1 / sqrt(2): kernels see only their arguments, tl and each other, not module constants.
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))


def _gelu_density_term(x):
    """x phi(x) (phi the standard normal density): d gelu / dx = Phi(x) + x phi(x)."""
    return x * tl.exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)


def _positions(Index, offs, ok, GATHER: tl.constexpr):
    """int64 positions of ``offs``: Index[offs] (0 where not ok) when GATHER, else offs themselves."""
    if GATHER:
        return tl.load(Index + offs, mask=ok, other=0).to(tl.int64)
    return offs.to(tl.int64)


def _matmul_kernel(
    A,
    B,
    C,
    Bias,
    Pre,
    Act,
    RowsA,
    RowsC,
    Mean,
    Rstd,
    NormW,
    NormB,
    ColSumC,
    M,
    N,
    K,
    m_bucket,  # autotune key only: M, N and K rounded up to powers of two (triton_runtime.size_bucket)
    n_bucket,
    k_bucket,
    kind,  # autotune key only
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_pm,
    stride_pn,
    GATHER_A_ROWS: tl.constexpr,
    GELU_B: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    STORE_ACT: tl.constexpr,
    SCATTER_C: tl.constexpr,
    NORM_A: tl.constexpr,
    NORM_B: tl.constexpr,
    NORM_HAS_BIAS: tl.constexpr,
    COL_SUM_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_SLICE: tl.constexpr,
):
    """C[m, n] = sum_k A[m, k] B[k, n] (float32 accumulation), addressed through strides and index vectors.

    A[m, k] is at A + a_row(m) * stride_am + k * stride_ak with a_row(m) = RowsA[m] when GATHER_A_ROWS
    (else m): d act's gather of d embeds at the image rows, whose row offsets are loaded once, before the
    K loop (a gather along K would put a dependent load in the loop, which costs the loop operand
    buffers: fused_projector._backward gathers d W2's rows beforehand). B[k, n] is at B + k * stride_bk +
    n * stride_bn, passed through GELU when GELU_B. Epilogues: _STORE (+ bias), _BIAS_GELU (Pre := acc + bias, C :=
    gelu(acc + bias)), _GELU_GRAD (C := acc * gelu'(Pre[m, n]); with STORE_ACT also Act := gelu(Pre), in
    Pre's layout, for d W2 to read plainly). C row m is RowsC[m] when SCATTER_C.

    LayerNorm in the loads, from per-row float32 Mean and Rstd: NORM_A normalizes A's rows (A[m, k] :=
    (A[m, k] - Mean[m]) * Rstd[m] * NormW[k] + NormB[k], forward GEMM 1); NORM_B normalizes B, whose rows
    are then the normalized rows (B[k, n] := (B[k, n] - Mean[k]) * Rstd[k] * NormW[n] + NormB[n], d W1).
    The normalized operand is rounded to the other operand's dtype, where F.layer_norm's output would be.

    COL_SUM_C: the epilogue also writes ColSumC[pid_m, n] = sum over this tile's rows of C (float32, before
    rounding): partial column sums, one row per row tile, which the caller sums. In d pre, that is d b1,
    from registers the epilogue holds anyway (cuBLASLt's BGRAD epilogues fuse bias gradients likewise).

    EPILOGUE_SLICE (a tuning parameter): the GELU epilogues run on column slices this wide (BLOCK_N halved
    until it fits); the plain store on the whole tile.
    """
    # Grouped tile order (the Triton matmul tutorial): GROUP_M row-tiles share the B column-tiles in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_rows = _positions(RowsA, offs_m, m_ok, GATHER_A_ROWS)
    if NORM_A:
        mean_m = tl.load(Mean + offs_m, mask=m_ok, other=0.0)
        rstd_m = tl.load(Rstd + offs_m, mask=m_ok, other=0.0)
    if NORM_B:
        weight_n = tl.load(NormW + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if NORM_HAS_BIAS:
            bias_n = tl.load(NormB + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(
            A + a_rows[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            B + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn,
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if GELU_B:
            b = _cast(_gelu(b.to(tl.float32)), B.dtype.element_ty, INTERPRET_BF16)
        if NORM_B:  # rows k of B are samples; out-of-range k meet zeros in A
            mean_k = tl.load(Mean + offs_k, mask=k_ok, other=0.0)
            rstd_k = tl.load(Rstd + offs_k, mask=k_ok, other=0.0)
            normed = (b.to(tl.float32) - mean_k[:, None]) * rstd_k[:, None] * weight_n[None, :]
            if NORM_HAS_BIAS:
                normed += bias_n[None, :]
            b = _cast(normed, A.dtype.element_ty, INTERPRET_BF16)
        if NORM_A:  # out-of-range k load zero weight and bias, so they stay zero
            weight_k = tl.load(NormW + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            normed = (a.to(tl.float32) - mean_m[:, None]) * rstd_m[:, None] * weight_k[None, :]
            if NORM_HAS_BIAS:
                normed += tl.load(NormB + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            a = _cast(normed, B.dtype.element_ty, INTERPRET_BF16)
        elif not NORM_B and A.dtype.element_ty != B.dtype.element_ty:  # float32 d embeds against half operands
            a = _cast(a.to(tl.float32), B.dtype.element_ty, INTERPRET_BF16)  # (NORM_B already rounded b to A's)
        acc = _dot(a, b, acc, DOT_PRECISION, INTERPRET_BF16)

    # The GELU epilogues read and write [BLOCK_M, n] tiles of Pre and Act beside the accumulator. Done in column
    # slices of EPILOGUE_SLICE, only one slice's loads and temporaries are live at a time: the slices are split
    # off the accumulator's registers, free in the wgmma layout (the Triton persistent-matmul tutorial subtiles
    # its epilogue likewise). Compiled for sm_90 at 128x256 with 8 warps, d act's epilogue spilled 1608 bytes
    # a thread whole, 296 in halves and none in quarters.
    _epilogue_slices(
        acc, pid_n * BLOCK_N, BLOCK_N, EPILOGUE_SLICE, offs_m, m_ok, pid_m, C, Bias, Pre, Act, ColSumC, RowsC, N,
        stride_cm, stride_cn, stride_pm, stride_pn,
        HAS_BIAS, EPILOGUE, STORE_ACT, SCATTER_C, COL_SUM_C, INTERPRET_BF16,
    )  # fmt: skip


def _halves(x):
    """x [rows, width] -> its columns [0, width / 2) and [width / 2, width)."""
    return tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2)), (0, 2, 1)))


def _epilogue_slices(
    acc, first_n, WIDTH: tl.constexpr, SLICE: tl.constexpr, offs_m, m_ok, pid_m, C, Bias, Pre, Act, ColSumC, RowsC,
    N, stride_cm, stride_cn, stride_pm, stride_pn,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_ACT: tl.constexpr, SCATTER_C: tl.constexpr,
    COL_SUM_C: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """_epilogue on acc's columns [first_n, first_n + WIDTH): whole for the plain store or when WIDTH <= SLICE,
    else halved until the slices are SLICE wide (a recursion Triton unrolls at compile time)."""
    if EPILOGUE == 0 or WIDTH <= SLICE:
        _epilogue(
            acc, first_n, WIDTH, offs_m, m_ok, pid_m, C, Bias, Pre, Act, ColSumC, RowsC, N,
            stride_cm, stride_cn, stride_pm, stride_pn,
            HAS_BIAS, EPILOGUE, STORE_ACT, SCATTER_C, COL_SUM_C, INTERPRET_BF16,
        )  # fmt: skip
    else:
        HALF: tl.constexpr = WIDTH // 2
        left, right = _halves(acc)
        _epilogue_slices(
            left, first_n, HALF, SLICE, offs_m, m_ok, pid_m, C, Bias, Pre, Act, ColSumC, RowsC, N,
            stride_cm, stride_cn, stride_pm, stride_pn,
            HAS_BIAS, EPILOGUE, STORE_ACT, SCATTER_C, COL_SUM_C, INTERPRET_BF16,
        )  # fmt: skip
        _epilogue_slices(
            right, first_n + HALF, HALF, SLICE, offs_m, m_ok, pid_m, C, Bias, Pre, Act, ColSumC, RowsC, N,
            stride_cm, stride_cn, stride_pm, stride_pn,
            HAS_BIAS, EPILOGUE, STORE_ACT, SCATTER_C, COL_SUM_C, INTERPRET_BF16,
        )  # fmt: skip


def _epilogue(
    acc,
    first_n,
    WIDTH: tl.constexpr,
    offs_m,
    m_ok,
    pid_m,
    C,
    Bias,
    Pre,
    Act,
    ColSumC,
    RowsC,
    N,
    stride_cm,
    stride_cn,
    stride_pm,
    stride_pn,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    STORE_ACT: tl.constexpr,
    SCATTER_C: tl.constexpr,
    COL_SUM_C: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    """The epilogue of _matmul_kernel on the accumulator's columns [first_n, first_n + WIDTH)."""
    offs_n = first_n + tl.arange(0, WIDTH)
    n_ok = offs_n < N
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:  # _BIAS_GELU
        pre_pointers = Pre + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :] * stride_pn
        tl.store(pre_pointers, _cast(acc, Pre.dtype.element_ty, INTERPRET_BF16), mask=mask)
        acc = _gelu(acc)
    if EPILOGUE == 2:  # _GELU_GRAD
        pre_pointers = Pre + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :] * stride_pn
        pre = tl.load(pre_pointers, mask=mask, other=0.0).to(tl.float32)
        cdf = _gelu_cdf(pre)
        if STORE_ACT:  # once per element here, instead of once per row tile of d W2 in its loads
            act_pointers = Act + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :] * stride_pn
            tl.store(act_pointers, _cast(pre * cdf, Act.dtype.element_ty, INTERPRET_BF16), mask=mask)
        acc = acc * (cdf + _gelu_density_term(pre))
    if COL_SUM_C:
        column_sums = tl.sum(tl.where(mask, acc, 0.0), 0)
        tl.store(ColSumC + pid_m.to(tl.int64) * N + offs_n, column_sums, mask=n_ok)
    c_rows = _positions(RowsC, offs_m, m_ok, SCATTER_C)
    c_pointers = C + c_rows[:, None] * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    tl.store(c_pointers, _cast(acc, C.dtype.element_ty, INTERPRET_BF16), mask=mask)


def _column_sum_kernel(
    X, Rows, Out, M, N, stride_m, rows_per_split, GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):  # fmt: skip
    """Out[s, n] = sum of X[row(m), n] over this program's split of m (rows_per_split, a multiple of BLOCK_M)
    in float32, row(m) = Rows[m] when GATHER: a bias gradient's partial sums, one row per split."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    first = split * rows_per_split
    for m0 in range(first, tl.minimum(first + rows_per_split, M), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = _positions(Rows, offs_m, m_ok, GATHER)
        x = tl.load(X + rows[:, None] * stride_m + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    tl.store(Out + split.to(tl.int64) * N + offs_n, acc, mask=n_ok)


def _layer_norm_stats_kernel(
    X, Mean, Rstd, n_rows, dim, stride_m, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    """Mean[m] and Rstd[m] = 1 / sqrt(var + eps) of BLOCK_M whole rows of X, in float32, two passes
    over the row in registers (mean, then the variance about it), as F.layer_norm."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < dim
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / dim
    centered = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, 1) / dim + eps)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for triton.autotune on a GPU: the Triton matmul
# tutorial's Hopper/Ampere configs for half precision, and its widest tile with a fourth operand buffer
# (192 KiB of shared memory; the loads are cp.async, not TMA, so a deeper queue hides more latency);
# float32 uses exact ("ieee") products on CUDA cores, where only small tiles avoid spills. Not yet swept
# on a GPU.
_GPU_CONFIGS = (
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
)
_GPU_FP32_CONFIGS = ((64, 64, 32, 4, 3), (32, 64, 32, 4, 3), (32, 32, 32, 4, 2))
# The interpreter runs each program in numpy; small, unequal tiles make tiny tests cross tile edges.
_INTERPRETER_CONFIG = (16, 32, 16, 4, 1)
_GROUP_M = 8
_COLUMN_SUM_BLOCKS = (64, 128)  # (BLOCK_M, BLOCK_N)
# The GELU epilogues' column slices (see _matmul_kernel) hold 32 values a thread: 64 columns at 128x256 with 8 warps,
# 32 at 256x128 (compiled for sm_90, d act's epilogue then spills at neither, nor at 128x128 with 4 warps).
# In the interpreter, quarters of its 32 columns, so the CPU tests run the most split path (test_fused_projector
# runs the others too).
_EPILOGUE_VALUES_PER_THREAD = 32
_INTERPRETER_EPILOGUE_SLICE = 8


def _epilogue_slice(block_m: int, block_n: int, warps: int) -> int:
    """The column slice of a tile's GELU epilogue: _EPILOGUE_VALUES_PER_THREAD a thread, at least a quarter tile."""
    return max(block_n // 4, _EPILOGUE_VALUES_PER_THREAD * 32 * warps // block_m)


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    """The kernels decorated for one mode (interpreter or GPU); see triton_runtime.make_jit."""
    import triton

    _, jit = make_jit(__name__)
    jit(_gelu)
    jit(_gelu_cdf)
    jit(_gelu_density_term)
    for helper in (_positions, _halves, _epilogue, _epilogue_slices):
        jit(helper)

    def config(m, n, k, warps, stages, epilogue_slice=None):
        if epilogue_slice is None:
            epilogue_slice = _epilogue_slice(m, n, warps)
        meta = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": _GROUP_M, "EPILOGUE_SLICE": epilogue_slice}
        return triton.Config(meta, num_warps=warps, num_stages=stages)

    # The rows of a batch (M of the forward and d act, K of the weight gradients) change with its image count;
    # keying on their exact value would re-time every config at each new count.
    key = ["m_bucket", "n_bucket", "k_bucket", "kind"]
    if interpret:
        interpreted = config(*_INTERPRETER_CONFIG, epilogue_slice=_INTERPRETER_EPILOGUE_SLICE)
        matmul = triton.autotune([interpreted], key=key)(jit(_matmul_kernel))
    else:

        def keep_for_dtype(configs, named_args, **kwargs):
            # the products' dtype, not A's: float32 d embeds (autocast) or features (LayerNorm) meet half weights
            wanted = _GPU_FP32_CONFIGS if kwargs["DOT_PRECISION"] == "ieee" else _GPU_CONFIGS
            return autotune_candidates([
                c
                for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in wanted
            ])

        matmul = triton.autotune(
            [config(*c) for c in _GPU_CONFIGS + _GPU_FP32_CONFIGS],
            key=key,
            prune_configs_by={"early_config_prune": keep_for_dtype},
            # a config with a smaller BLOCK_M writes more partial rows than the chosen one overwrites
            reset_to_zero=["ColSumC"],
        )(jit(_matmul_kernel))
    return types.SimpleNamespace(
        matmul=matmul,
        column_sum=jit(_column_sum_kernel),
        layer_norm_stats=jit(_layer_norm_stats_kernel),
        layer_norm_backward=jit(_norm_bwd_kernel),  # RMSNorm's backward kernel, with LAYER_NORM
    )
