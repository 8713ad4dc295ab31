"""The LLaVA merge step fused: vision features -> MLP projector -> rows of the packed sequence buffer.

    features [M = N_img * P, D_v] -> (LayerNorm) -> Linear(D_v -> D_h) + bias -> GELU -> Linear(D_h -> D) + bias
    -> embeds[rows[m]] for m < M, where rows are the image-token positions of the packed batch

Eager PyTorch does this in five passes over [M, *] tensors (two GEMMs, GELU, a dtype cast and a
masked_scatter/concat with copies). Here:

- forward GEMM 1 adds the bias and applies GELU in its epilogue; it writes the pre-activation (kept
  for the backward) and the activation;
- forward GEMM 2 adds the bias and stores each row straight into ``embeds[rows[m]]`` (the scatter is
  the store), in embeds' dtype; embeds is updated in place (autograd sees an in-place op);
- backward: d act = (d embeds gathered at rows) @ W2 with GELU's derivative in the epilogue (the
  gather is in the GEMM's loads), d W2 = (gathered d embeds)^T @ gelu(pre) (GELU recomputed in the
  loads, so the activation is never saved), d W1 = d pre^T @ x, d x = d pre @ W1, and the two bias
  gradients as column sums (the first gathered at rows).

Layers, as in STYLE.md: the plain-PyTorch reference (:func:`projector_scatter_reference`), private
kernels (plain functions, decorated on first use), launchers, an autograd Function, the public
:func:`projector_scatter` and the thin :class:`FusedProjector` (the state dict of
``vlm_core.model.projector.Projector``: ``fc1``, ``fc2``; plus ``norm`` when built with a LayerNorm).
The optional LayerNorm runs as PyTorch's own fused layer_norm before the fused GEMMs.
TODO(projector-layernorm): normalise in GEMM 1's loads instead, saving one [M, D_v] round trip.
"""

from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

# _cast and _dot are device helpers the kernels call; make_jit decorates them with them.
from vlm_core.kernels.triton_runtime import (
    _cast,
    _dot,
    check_can_run,
    check_dtype,
    compute_dtype,
    interpret_bf16,
    interpreting,
    make_jit,
)

if TYPE_CHECKING:
    import triton.language as tl  # noqa: TC004  (kernels get the real module as a global from make_jit)


# GEMM kinds (part of the autotuning key, so each gets its own tuned tile).
_FWD_GELU, _FWD_SCATTER, _BWD_DACT, _BWD_DW2, _BWD_DW1, _BWD_DX = range(6)
# Epilogues.
_STORE, _BIAS_GELU, _GELU_GRAD = 0, 1, 2


def projector_reference(
    features: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """features [..., D_v] -> [..., D]: (LayerNorm), fc1, exact GELU, fc2; Projector.forward's math."""
    x = features
    if norm_weight is not None:
        x = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, norm_eps)
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def projector_scatter_reference(
    embeds: torch.Tensor,
    features: torch.Tensor,
    rows: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """A new [total, D] tensor: embeds with row rows[m] replaced by the projected features[m]; the specification.

    The same values as ``VLM.embed_inputs``'s ``masked_scatter`` when rows are the image-token
    positions in increasing order.
    """
    tokens = projector_reference(features, fc1_weight, fc1_bias, fc2_weight, fc2_bias, norm_weight, norm_bias, norm_eps)
    return embeds.index_copy(0, rows, tokens.to(embeds.dtype))


# --------------------------------------------------------------------------------------------
# Kernels. Plain functions here; _kernels() compiles them with triton.jit on first use.
# --------------------------------------------------------------------------------------------


def _gelu(x):
    """Exact (erf) GELU of float32 x, as F.gelu's default."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # 1 / sqrt(2)


def _gelu_grad(x):
    """d gelu / dx of float32 x."""
    # 1 / sqrt(2) and 1 / sqrt(2 pi): kernels see only their arguments, tl and each other, not module constants.
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327


def _matmul_kernel(
    A,
    B,
    C,
    Bias,
    Pre,
    RowsA,
    IndexK,
    RowsC,
    M,
    N,
    K,
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
    GATHER_K: tl.constexpr,
    GELU_B: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    SCATTER_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[m, n] = sum_k A[m, k] B[k, n] (float32 accumulation), addressed through strides and index vectors.

    A[m, k] is at A + a_row(m) * stride_am + a_col(k) * stride_ak with a_row(m) = RowsA[m] when
    GATHER_A_ROWS (else m) and a_col(k) = IndexK[k] when GATHER_K (else k): the gather of d embeds
    at the image rows, in the backward. B[k, n] is at B + k * stride_bk + n * stride_bn, passed
    through GELU when GELU_B. Epilogues: _STORE (+ bias), _BIAS_GELU (Pre := acc + bias, C :=
    gelu(acc + bias)), _GELU_GRAD (C := acc * gelu'(Pre[m, n])). C row m is RowsC[m] when SCATTER_C.
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
    if GATHER_A_ROWS:
        a_rows = tl.load(RowsA + offs_m, mask=m_ok, other=0).to(tl.int64)
    else:
        a_rows = offs_m.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if GATHER_K:
            a_cols = tl.load(IndexK + offs_k, mask=k_ok, other=0).to(tl.int64)
        else:
            a_cols = offs_k.to(tl.int64)
        a = tl.load(
            A + a_rows[:, None] * stride_am + a_cols[None, :] * stride_ak,
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
        if A.dtype.element_ty != B.dtype.element_ty:  # float32 d embeds against half operands
            a = _cast(a.to(tl.float32), B.dtype.element_ty, INTERPRET_BF16)
        acc = _dot(a, b, acc, DOT_PRECISION, INTERPRET_BF16)

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
        acc = acc * _gelu_grad(pre)
    if SCATTER_C:
        c_rows = tl.load(RowsC + offs_m, mask=m_ok, other=0).to(tl.int64)
    else:
        c_rows = offs_m.to(tl.int64)
    c_pointers = C + c_rows[:, None] * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    tl.store(c_pointers, _cast(acc, C.dtype.element_ty, INTERPRET_BF16), mask=mask)


def _column_sum_kernel(X, Rows, Out, M, N, stride_m, GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out[n] = sum_m X[row(m), n] in float32, row(m) = Rows[m] when GATHER (a bias gradient)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        if GATHER:
            rows = tl.load(Rows + offs_m, mask=m_ok, other=0).to(tl.int64)
        else:
            rows = offs_m.to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_m + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    tl.store(Out + offs_n, acc, mask=n_ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for triton.autotune on a GPU: the Triton matmul
# tutorial's Hopper/Ampere configs for half precision; float32 uses exact ("ieee") products on CUDA
# cores, where only small tiles avoid spills. Not yet swept on a GPU.
_GPU_CONFIGS = (
    (128, 256, 64, 8, 3),
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


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    """The kernels decorated for one mode (interpreter or GPU); see triton_runtime.make_jit."""
    import triton

    _, jit = make_jit(__name__)
    jit(_gelu)
    jit(_gelu_grad)

    def config(m, n, k, warps, stages):
        return triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": _GROUP_M}, num_warps=warps, num_stages=stages
        )

    key = ["M", "N", "K", "kind"]
    if interpret:
        matmul = triton.autotune([config(*_INTERPRETER_CONFIG)], key=key)(jit(_matmul_kernel))
    else:

        def keep_for_dtype(configs, named_args, **kwargs):
            wanted = _GPU_FP32_CONFIGS if named_args["A"].dtype == torch.float32 else _GPU_CONFIGS
            return [
                c
                for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in wanted
            ]

        matmul = triton.autotune(
            [config(*c) for c in _GPU_CONFIGS + _GPU_FP32_CONFIGS],
            key=key,
            prune_configs_by={"early_config_prune": keep_for_dtype},
        )(jit(_matmul_kernel))
    return types.SimpleNamespace(matmul=matmul, column_sum=jit(_column_sum_kernel))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _matmul(
    kind: int,
    a: torch.Tensor,
    a_strides: tuple[int, int],
    b: torch.Tensor,
    b_strides: tuple[int, int],
    c: torch.Tensor,
    m: int,
    n: int,
    k: int,
    *,
    rows_a: torch.Tensor | None = None,
    index_k: torch.Tensor | None = None,
    gelu_b: bool = False,
    bias: torch.Tensor | None = None,
    epilogue: int = _STORE,
    pre: torch.Tensor | None = None,
    rows_c: torch.Tensor | None = None,
) -> None:
    """One launch of _matmul_kernel; a, b, c row-major storage with the given (row, column) strides of the
    logical operands A [m, k] and B [k, n]; c is [m or rows, n] row-major."""
    import triton

    if m == 0 or n == 0:
        return
    dummy = c  # pointer arguments the flags leave unused
    pre_t = pre if pre is not None else dummy
    bf16 = interpret_bf16(a.dtype) or interpret_bf16(c.dtype)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _kernels(interpreting()).matmul[grid](
        a, b, c, bias if bias is not None else dummy, pre_t,
        rows_a if rows_a is not None else dummy, index_k if index_k is not None else dummy,
        rows_c if rows_c is not None else dummy,
        m, n, k, kind,
        a_strides[0], a_strides[1], b_strides[0], b_strides[1], c.stride(0), c.stride(1),
        pre_t.stride(0), pre_t.stride(1),
        GATHER_A_ROWS=rows_a is not None, GATHER_K=index_k is not None, GELU_B=gelu_b,
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, SCATTER_C=rows_c is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", INTERPRET_BF16=bf16,
    )  # fmt: skip


def _column_sum(x: torch.Tensor, m: int, rows: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """[n] = sum over m rows of x (gathered at rows when given), float32 accumulation."""
    import triton

    n = x.shape[1]
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    block_m, block_n = _COLUMN_SUM_BLOCKS
    _kernels(interpreting()).column_sum[(triton.cdiv(n, block_n),)](
        x, rows if rows is not None else x, out, m, n, x.stride(0),
        GATHER=rows is not None, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return out.to(out_dtype)


def _forward(embeds, x, rows, w1, b1, w2, b2) -> torch.Tensor:
    """Writes the projected x into embeds[rows] in place; returns pre [M, D_h] (compute dtype)."""
    m, dim_v = x.shape
    dim_h = w1.shape[0]
    dim = w2.shape[0]
    pre = torch.empty((m, dim_h), dtype=x.dtype, device=x.device)
    act = torch.empty((m, dim_h), dtype=x.dtype, device=x.device)
    # act = gelu(x @ w1^T + b1): A = x [m, D_v]; B[k, n] = w1[n, k].
    _matmul(_FWD_GELU, x, (dim_v, 1), w1, (1, dim_v), act, m, dim_h, dim_v,
            bias=b1, epilogue=_BIAS_GELU, pre=pre)  # fmt: skip
    # embeds[rows] = act @ w2^T + b2: B[k, n] = w2[n, k]; the store is the scatter.
    _matmul(_FWD_SCATTER, act, (dim_h, 1), w2, (1, dim_h), embeds, m, dim, dim_h, bias=b2, rows_c=rows)
    return pre


def _backward(grad_embeds, x, rows, w1, w2, pre, needs):
    """(d x, d w1, d b1, d w2, d b2) in float32-accumulated compute dtype (None where not needed)."""
    m, dim_v = x.shape
    dim_h = w1.shape[0]
    dim = w2.shape[0]
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    stride_g = grad_embeds.stride(0)
    grad_w2 = grad_b2 = grad_w1 = grad_b1 = grad_x = None
    if need_w2:
        # d w2 [D, D_h] = G[rows]^T @ gelu(pre): A[i, t] = G[rows[t], i]; B[t, j] = gelu(pre[t, j]).
        grad_w2 = torch.empty((dim, dim_h), dtype=torch.float32, device=x.device)
        _matmul(_BWD_DW2, grad_embeds, (1, stride_g), pre, (dim_h, 1), grad_w2, dim, dim_h, m,
                index_k=rows, gelu_b=True)  # fmt: skip
    if need_b2:
        grad_b2 = _column_sum(grad_embeds, m, rows, torch.float32)
    if need_x or need_w1 or need_b1:
        # d pre [M, D_h] = (G[rows] @ w2) * gelu'(pre): A[t, k] = G[rows[t], k]; B[k, n] = w2[k, n].
        grad_pre = torch.empty((m, dim_h), dtype=x.dtype, device=x.device)
        _matmul(_BWD_DACT, grad_embeds, (stride_g, 1), w2, (dim_h, 1), grad_pre, m, dim_h, dim,
                rows_a=rows, epilogue=_GELU_GRAD, pre=pre)  # fmt: skip
        if need_w1:
            # d w1 [D_h, D_v] = d pre^T @ x: A[i, t] = dpre[t, i]; B[t, j] = x[t, j].
            grad_w1 = torch.empty((dim_h, dim_v), dtype=torch.float32, device=x.device)
            _matmul(_BWD_DW1, grad_pre, (1, dim_h), x, (dim_v, 1), grad_w1, dim_h, dim_v, m)
        if need_b1:
            grad_b1 = _column_sum(grad_pre, m, None, torch.float32)
        if need_x:
            # d x [M, D_v] = d pre @ w1: B[k, n] = w1[k, n].
            grad_x = torch.empty((m, dim_v), dtype=x.dtype, device=x.device)
            _matmul(_BWD_DX, grad_pre, (dim_h, 1), w1, (dim_v, 1), grad_x, m, dim_v, dim_h)
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


class _ProjectorScatterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeds, features, rows, w1, b1, w2, b2):
        dtype = compute_dtype(features)
        with torch.autocast(features.device.type, enabled=False):
            x = features.to(dtype).contiguous()
            w1c, w2c = w1.to(dtype).contiguous(), w2.to(dtype).contiguous()
            pre = _forward(embeds, x, rows, w1c, b1, w2c, b2)
        ctx.mark_dirty(embeds)
        ctx.save_for_backward(x, rows, w1c, w2c, pre)
        ctx.dtypes = (features.dtype, w1.dtype, None if b1 is None else b1.dtype, w2.dtype,
                      None if b2 is None else b2.dtype)  # fmt: skip
        return embeds

    @staticmethod
    def backward(ctx, grad_out):
        x, rows, w1, w2, pre = ctx.saved_tensors
        _, need_features, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        needs = (need_features, need_w1, need_b1 and ctx.dtypes[2] is not None, need_w2,
                 need_b2 and ctx.dtypes[4] is not None)  # fmt: skip
        grad_out = grad_out.contiguous()
        with torch.autocast(grad_out.device.type, enabled=False):
            grads = _backward(grad_out, x, rows, w1, w2, pre, needs)  # d embeds cast per tile in the loads
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        grad_embeds = None
        if ctx.needs_input_grad[0]:  # the image rows were overwritten: no gradient flows to their old values
            grad_embeds = grad_out.index_fill(0, rows, 0)
        return grad_embeds, grads[0], None, grads[1], grads[2], grads[3], grads[4]


def _check_limits(embeds, features, rows, w1, b1, w2, b2) -> None:
    check_can_run("projector_scatter_triton", features.device)
    if features.dim() != 2 or embeds.dim() != 2 or w1.dim() != 2 or w2.dim() != 2:
        raise ValueError(
            f"projector_scatter_triton: features {tuple(features.shape)} must be (M, D_v), embeds "
            f"{tuple(embeds.shape)} (total, D), fc1_weight {tuple(w1.shape)} (D_h, D_v), fc2_weight "
            f"{tuple(w2.shape)} (D, D_h)"
        )
    m, dim_v = features.shape
    dim_h, dim = w1.shape[0], w2.shape[0]
    if w1.shape[1] != dim_v or w2.shape[1] != dim_h or embeds.shape[1] != dim:
        raise ValueError(
            f"projector_scatter_triton: shapes do not chain: features (M={m}, D_v={dim_v}), fc1_weight "
            f"{tuple(w1.shape)} should be ({dim_h}, {dim_v}), fc2_weight {tuple(w2.shape)} should be "
            f"({dim}, {dim_h}), embeds {tuple(embeds.shape)} should be (total, {dim})"
        )
    for name, bias, size in (("fc1_bias", b1, dim_h), ("fc2_bias", b2, dim)):
        if bias is not None and bias.shape != (size,):
            raise ValueError(f"projector_scatter_triton: {name} has shape {tuple(bias.shape)}, expected ({size},)")
    for name, tensor in (("embeds", embeds), ("features", features), ("fc1_weight", w1), ("fc2_weight", w2),
                         ("fc1_bias", b1), ("fc2_bias", b2)):  # fmt: skip
        if tensor is None:
            continue
        check_dtype("projector_scatter_triton", name, tensor)
        if tensor.device != features.device:
            raise ValueError(f"projector_scatter_triton: {name} is on {tensor.device}, features on {features.device}")
    if rows.shape != (m,) or rows.dtype not in (torch.int32, torch.int64) or rows.device != features.device:
        raise ValueError(
            f"projector_scatter_triton: rows must be ({m},) int32/int64 on {features.device} (one packed row per "
            f"image token), got {tuple(rows.shape)} {rows.dtype} on {rows.device}"
        )
    if not embeds.is_contiguous():
        raise ValueError("projector_scatter_triton: embeds must be contiguous (its rows are written in place)")


def projector_scatter_triton(
    embeds: torch.Tensor,
    features: torch.Tensor,
    rows: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Project ``features`` with the 2-layer GELU MLP and write row m into ``embeds[rows[m]]``, fused; returns embeds.

    Arguments:
        embeds: (total, D) contiguous, the packed sequence buffer; updated in place (autograd sees an
            in-place op; the overwritten rows get no gradient, as with masked_scatter).
        features: (M, D_v), M = N_img * P image tokens in the order of ``rows``.
        rows: (M,) int32/int64, distinct, each in [0, total) (not checked on the device: the
            caller's image-token positions, e.g. ``(input_ids == image_token_id).nonzero()``).
        fc1_weight: (D_h, D_v); fc1_bias: (D_h,) or None; fc2_weight: (D, D_h); fc2_bias: (D,) or None.
    Returns:
        embeds. Differentiable in embeds, features and the four parameters.

    float16, bfloat16 or float32 (mixed allowed); the GEMMs run in features' dtype, or autocast's when
    autocast is on (inputs cast once, as F.linear under autocast would), with float32 accumulation;
    bias, GELU (exact erf) and their gradients in float32; the projected rows are stored in embeds'
    dtype; parameter gradients accumulate in float32 over all M tokens and are rounded once. CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1 (tests only). Every limit raises ValueError.
    Tested in tests/vlm_core/kernels/test_fused_projector.py against a float64 reference
    (interpreter on the CPU; the GPU cases there, LLaVA-1.5 widths, were not run when this was written).
    """
    _check_limits(embeds, features, rows, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return _ProjectorScatterFunction.apply(
        embeds, features, rows.contiguous(), fc1_weight, fc1_bias, fc2_weight, fc2_bias
    )


def projector_scatter(
    embeds: torch.Tensor,
    features: torch.Tensor,
    rows: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    impl: str = "reference",
) -> torch.Tensor:
    """embeds with rows[m] := projector(features[m]), through ``impl``: "triton" writes embeds in place,
    "reference" returns a new tensor. Use the returned tensor either way."""
    if impl == "triton":
        return projector_scatter_triton(embeds, features, rows, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if impl == "reference":
        return projector_scatter_reference(embeds, features, rows, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    raise ValueError(f"projector_scatter: unknown impl={impl!r}; expected 'reference' or 'triton'")


def fusable_projector_problem(projector: nn.Module) -> str:
    """Why ``projector`` cannot run fused ("" if it can): it needs plain ``fc1``/``fc2`` nn.Linear layers
    (a tensor-parallel projector, say, shards them and needs its own collectives)."""
    for name in ("fc1", "fc2"):
        layer = getattr(projector, name, None)
        if type(layer) is not nn.Linear:
            return f"projector.{name} is {type(layer).__name__}, not a plain nn.Linear"
    return ""


class FusedProjector(nn.Module):
    """(LayerNorm) -> Linear(D_v -> D_h) -> GELU -> Linear(D_h -> D), fused and scattered into the packed buffer.

    State dict: ``fc1.*``, ``fc2.*`` as ``vlm_core.model.projector.Projector`` (checkpoints load in
    either direction), plus ``norm.*`` with ``layer_norm=True``.

    ``forward(features)``: [..., D_v] -> [..., D]. ``forward(features, embeds, rows)``: writes the
    projected features [M, D_v] into ``embeds[rows]`` in place and returns embeds.
    """

    def __init__(self, vision_dim: int, hidden_dim: int, dim: int, layer_norm: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(vision_dim, eps=norm_eps) if layer_norm else None
        self.fc1 = nn.Linear(vision_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(
        self, features: torch.Tensor, embeds: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.norm is not None:
            features = self.norm(features)
        dim_v = features.shape[-1]
        if embeds is None:
            flat = features.reshape(-1, dim_v)  # [M, D_v]
            out = torch.empty((flat.shape[0], self.fc2.out_features), dtype=compute_dtype(flat), device=flat.device)
            rows = torch.arange(flat.shape[0], device=flat.device)
            out = projector_scatter_triton(out, flat, rows, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
            return out.view(*features.shape[:-1], self.fc2.out_features)
        if rows is None:
            raise ValueError("FusedProjector: pass rows (the packed image-token positions) together with embeds")
        return projector_scatter_triton(
            embeds, features.reshape(-1, dim_v), rows, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        )


__all__ = [
    "FusedProjector",
    "fusable_projector_problem",
    "projector_reference",
    "projector_scatter",
    "projector_scatter_reference",
    "projector_scatter_triton",
]
