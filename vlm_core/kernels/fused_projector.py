"""The LLaVA merge step fused: vision features -> MLP projector -> rows of the packed sequence buffer.

    features [M = N_img * P, D_v] -> (LayerNorm) -> Linear(D_v -> D_h) + bias -> GELU -> Linear(D_h -> D) + bias
    -> embeds[rows[m]] for m < M, where rows are the image-token positions of the packed batch

Eager PyTorch does this in five passes over [M, *] tensors (two GEMMs, GELU, a dtype cast and a
masked_scatter/concat with copies). Here:

- the optional LayerNorm is applied in GEMM 1's loads: a row-statistics kernel writes mean and 1/std
  per row ([M] float32 each), and GEMM 1 normalizes each A tile as it loads it, so the normalized
  [M, D_v] is neither written nor kept for the backward (the raw features and the two statistics are);
- forward GEMM 1 adds the bias and applies GELU in its epilogue; it writes the pre-activation (kept
  for the backward) and the activation;
- forward GEMM 2 adds the bias and stores each row straight into ``embeds[rows[m]]`` (the scatter is
  the store), in embeds' dtype; embeds is updated in place (autograd sees an in-place op);
- backward: d act = (d embeds gathered at rows) @ W2 with GELU's derivative in the epilogue (the
  gather is in the GEMM's loads), which also writes gelu(pre) from the pre it loads (the activation is
  not saved by the forward, only rebuilt for the backward's d W2); d W2 = (gathered d embeds)^T @
  gelu(pre) from a gathered copy of d embeds' image rows (gathered in the loads, the rows would be an
  index inside d W2's K loop, which Triton pipelines with fewer buffers), d W1 = d pre^T @ x, d x =
  d pre @ W1; d b1 as column sums of d pre in d act's epilogue, d b2 as column sums of that copy (a pass
  split over rows). With the LayerNorm, d W1's loads normalize x again from the saved statistics, and d x is
  LayerNorm's backward of d pre @ W1: RMSNorm's row kernel in its LayerNorm mode, which also sums the
  norm's d weight and d bias per program, in float32.

Layers, as in STYLE.md: the plain-PyTorch reference (:func:`projector_scatter_reference`), the private
kernels (fused_projector_kernels.py, decorated on first use), launchers, an autograd Function, the public
:func:`projector_scatter` and the thin :class:`FusedProjector` (the state dict of
``vlm_core.model.projector.Projector``: ``fc1``, ``fc2``; plus ``norm`` when built with a LayerNorm).
InternVL's projector (``mlp1``) puts a LayerNorm before the MLP; LLaVA-1.5's ``mlp2x_gelu`` has none.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlm_core.kernels.fused_projector_kernels import (
    _BIAS_GELU,
    _BWD_DACT,
    _BWD_DW1,
    _BWD_DW2,
    _BWD_DW2_GELU,
    _BWD_DX,
    _COLUMN_SUM_BLOCKS,
    _FWD_GELU,
    _FWD_SCATTER,
    _GELU_GRAD,
    _GPU_CONFIGS,
    _GPU_FP32_CONFIGS,
    _INTERPRETER_CONFIG,
    _STORE,
    _kernels,
)
from vlm_core.kernels.triton_runtime import (
    MAX_ROW_DIM,
    check_can_run,
    check_dtype,
    compute_dtype,
    interpret_bf16,
    interpreting,
    reduction_programs,
    row_launch_settings,
    size_bucket,
)


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
# Launchers
# --------------------------------------------------------------------------------------------


class _Norm(NamedTuple):
    """A LayerNorm applied in a GEMM's loads: per-row float32 statistics and the norm's parameters."""

    mean: torch.Tensor  # [M] float32
    rstd: torch.Tensor  # [M] float32, 1 / sqrt(var + eps)
    weight: torch.Tensor  # [D_v]
    bias: torch.Tensor | None  # [D_v]


def _row_tiles_bound(m: int, dot_precision: str) -> int:
    """The most row tiles a launch over m rows can have: m over the smallest BLOCK_M autotuning may pick."""
    if interpreting():
        block_m = _INTERPRETER_CONFIG[0]
    else:
        block_m = min(c[0] for c in (_GPU_FP32_CONFIGS if dot_precision == "ieee" else _GPU_CONFIGS))
    return -(-m // block_m)


def _dot_precision(a: torch.Tensor, b: torch.Tensor, norm_a: _Norm | None, norm_b: _Norm | None) -> str:
    """The kernel rounds the operand that is transformed in its loads (or A, when neither is) to the other's
    dtype; float32 products are exact ("ieee"), half ones run on tensor cores ("tf32" is then ignored)."""
    operands = a.dtype if norm_b is not None else b.dtype
    return "ieee" if operands == torch.float32 else "tf32"


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
    gelu_b: bool = False,
    bias: torch.Tensor | None = None,
    epilogue: int = _STORE,
    pre: torch.Tensor | None = None,
    act: torch.Tensor | None = None,
    rows_c: torch.Tensor | None = None,
    norm_a: _Norm | None = None,
    norm_b: _Norm | None = None,
    sum_columns: bool = False,
) -> torch.Tensor | None:
    """One launch of _matmul_kernel; a, b, c row-major storage with the given (row, column) strides of the
    logical operands A [m, k] and B [k, n]; c is [m or rows, n] row-major. norm_a / norm_b: the LayerNorm
    applied to A's rows / B's rows as they are loaded. With sum_columns, returns C's column sums [n] in
    float32 (from the epilogue's partial sums per row tile), else None. act: with the _GELU_GRAD epilogue, also
    written gelu(pre), in pre's layout."""
    import triton

    if norm_a is not None and norm_b is not None:
        raise ValueError("_matmul: a LayerNorm in the loads of A or of B, not both")
    if act is not None and (epilogue != _GELU_GRAD or pre is None or act.stride() != pre.stride()):
        raise ValueError("_matmul: act is written by the _GELU_GRAD epilogue, in pre's layout")
    if m == 0 or n == 0:
        return torch.zeros(n, dtype=torch.float32, device=c.device) if sum_columns else None
    dummy = c  # pointer arguments the flags leave unused
    pre_t = pre if pre is not None else dummy
    precision = _dot_precision(a, b, norm_a, norm_b)
    if sum_columns:  # a row per row tile the smallest BLOCK_M could make; rows past the chosen count stay zero
        col_sums = torch.zeros((_row_tiles_bound(m, precision), n), dtype=torch.float32, device=c.device)
    else:  # an unread placeholder, never c: the autotuner zeroes this argument before each trial
        col_sums = torch.empty(1, dtype=torch.float32, device=c.device)
    norm = norm_a if norm_a is not None else norm_b
    norm_args = (dummy,) * 4 if norm is None else (norm.mean, norm.rstd, norm.weight,
                                                   norm.bias if norm.bias is not None else dummy)  # fmt: skip
    bf16 = interpret_bf16(a.dtype) or interpret_bf16(b.dtype) or interpret_bf16(c.dtype)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _kernels(interpreting()).matmul[grid](
        a, b, c, bias if bias is not None else dummy, pre_t, act if act is not None else dummy,
        rows_a if rows_a is not None else dummy,
        rows_c if rows_c is not None else dummy, *norm_args, col_sums,
        m, n, k, size_bucket(m), size_bucket(n), size_bucket(k), kind,
        a_strides[0], a_strides[1], b_strides[0], b_strides[1], c.stride(0), c.stride(1),
        pre_t.stride(0), pre_t.stride(1),
        GATHER_A_ROWS=rows_a is not None, GELU_B=gelu_b,
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, STORE_ACT=act is not None, SCATTER_C=rows_c is not None,
        NORM_A=norm_a is not None, NORM_B=norm_b is not None, NORM_HAS_BIAS=norm is not None and norm.bias is not None,
        COL_SUM_C=sum_columns,
        DOT_PRECISION=precision, INTERPRET_BF16=bf16,
    )  # fmt: skip
    return col_sums.sum(0) if sum_columns else None


def _column_sum(x: torch.Tensor, m: int, rows: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """[n] = sum over m rows of x (gathered at rows when given), float32 accumulation: the rows split over
    enough programs to fill the GPU (a [4096]-wide sum is only 32 column tiles), then the splits summed."""
    import triton

    n = x.shape[1]
    block_m, block_n = _COLUMN_SUM_BLOCKS
    column_tiles = triton.cdiv(n, block_n)
    row_blocks = max(1, triton.cdiv(m, block_m))
    wanted = max(1, reduction_programs(column_tiles * row_blocks, x.device) // column_tiles)  # <= row_blocks
    rows_per_split = triton.cdiv(row_blocks, wanted) * block_m
    splits = triton.cdiv(row_blocks * block_m, rows_per_split)  # none of them empty
    partial = torch.empty((splits, n), dtype=torch.float32, device=x.device)
    _kernels(interpreting()).column_sum[(column_tiles, splits)](
        x, rows if rows is not None else x, partial, m, n, x.stride(0), rows_per_split,
        GATHER=rows is not None, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return partial.sum(0).to(out_dtype)


def _layer_norm_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and 1 / sqrt(var + eps) of x [M, D_v], float32."""
    import triton

    m, dim_v = x.shape
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return mean, rstd
    block_m, block_d, num_warps = row_launch_settings(dim_v)
    _kernels(interpreting()).layer_norm_stats[(triton.cdiv(m, block_m),)](
        x, mean, rstd, m, dim_v, x.stride(0), eps, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps
    )
    return mean, rstd


def _layer_norm_backward(
    grad_normed: torch.Tensor, x: torch.Tensor, norm: _Norm, want_dx: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(d x in x's dtype or None, d weight, d bias float32) of the LayerNorm, from d normed [M, D_v].
    d x overwrites grad_normed when the dtypes agree."""
    import triton

    m, dim_v = x.shape
    block_m, block_d, num_warps = row_launch_settings(dim_v)
    programs = reduction_programs(triton.cdiv(m, block_m), x.device)
    partial = torch.empty((2, programs, dim_v), dtype=torch.float32, device=x.device)
    grad_x = None
    if want_dx:
        grad_x = grad_normed if grad_normed.dtype == x.dtype else torch.empty_like(x)
    bf16 = interpret_bf16(x.dtype) or interpret_bf16(grad_normed.dtype)
    _kernels(interpreting()).layer_norm_backward[(programs,)](
        grad_normed, x, norm.weight, norm.mean, norm.rstd, grad_x if want_dx else grad_normed, partial[0],
        partial[1], m, dim_v, LAYER_NORM=True, WANT_DX=want_dx, BLOCK_M=block_m, BLOCK_D=block_d,
        INTERPRET_BF16=bf16, num_warps=num_warps,
    )  # fmt: skip
    sums = partial.sum(1)
    return grad_x, sums[0], sums[1]


def _forward(embeds, x, rows, w1, b1, w2, b2, norm: _Norm | None) -> torch.Tensor:
    """Writes the projected x (LayerNormed in GEMM 1's loads with ``norm``) into embeds[rows] in place;
    returns pre [M, D_h] (compute dtype)."""
    m, dim_v = x.shape
    dim_h = w1.shape[0]
    dim = w2.shape[0]
    pre = torch.empty((m, dim_h), dtype=w1.dtype, device=x.device)
    act = torch.empty((m, dim_h), dtype=w1.dtype, device=x.device)
    # act = gelu(norm(x) @ w1^T + b1): A = x [m, D_v]; B[k, n] = w1[n, k].
    _matmul(_FWD_GELU, x, (dim_v, 1), w1, (1, dim_v), act, m, dim_h, dim_v,
            bias=b1, epilogue=_BIAS_GELU, pre=pre, norm_a=norm)  # fmt: skip
    # embeds[rows] = act @ w2^T + b2: B[k, n] = w2[n, k]; the store is the scatter.
    _matmul(_FWD_SCATTER, act, (dim_h, 1), w2, (1, dim_h), embeds, m, dim, dim_h, bias=b2, rows_c=rows)
    return pre


def _backward(grad_embeds, x, rows, w1, w2, pre, norm: _Norm | None, needs):
    """(d x, d w1, d b1, d w2, d b2, d norm weight, d norm bias), float32-accumulated (None where not needed)."""
    m, dim_v = x.shape
    dim_h = w1.shape[0]
    dim = w2.shape[0]
    need_x, need_w1, need_b1, need_w2, need_b2, need_norm_w, need_norm_b = needs
    need_normed = need_x or need_norm_w or need_norm_b  # d of GEMM 1's (normalized) input
    stride_g = grad_embeds.stride(0)
    grad_w2 = grad_b2 = grad_w1 = grad_b1 = grad_x = grad_norm_w = grad_norm_b = None
    grad_pre = act = None
    if need_normed or need_w1 or need_b1:
        # d pre [M, D_h] = (G[rows] @ w2) * gelu'(pre): A[t, k] = G[rows[t], k]; B[k, n] = w2[k, n];
        # d b1 = the column sums of d pre, per row tile in the epilogue; gelu(pre) for d W2 from the same
        # loads of pre
        grad_pre = torch.empty((m, dim_h), dtype=w1.dtype, device=x.device)
        act = torch.empty_like(pre) if need_w2 else None
        grad_b1 = _matmul(_BWD_DACT, grad_embeds, (stride_g, 1), w2, (dim_h, 1), grad_pre, m, dim_h, dim,
                          rows_a=rows, epilogue=_GELU_GRAD, pre=pre, act=act, sum_columns=need_b1)  # fmt: skip
    grad_image = None
    if need_w2:
        # d w2 [D, D_h] = G[rows]^T @ gelu(pre): A[i, t] = G[rows[t], i]; B[t, j] = gelu(pre[t, j]), read from
        # act, or, when nothing needed d pre, recomputed in the loads (once per row tile of d w2: 32 times at
        # D = 4096 with 128-row tiles, and the transformed B cannot go straight to shared memory).
        # G's image rows are gathered into a copy [M, D] first. Here the gather would be along K, inside the
        # loop (d act's is along M, outside it), and a load whose address is another load in the loop makes
        # Triton keep two operand buffers instead of num_stages: 2 against 3-4 at 128x256 when compiled for
        # sm_90, in the longest K loop of the op (K = M). The copy costs one read and write of [M, D].
        grad_image = grad_embeds.index_select(0, rows)  # [M, D]
        grad_w2 = torch.empty((dim, dim_h), dtype=torch.float32, device=x.device)
        if act is not None:
            _matmul(_BWD_DW2, grad_image, (1, dim), act, (dim_h, 1), grad_w2, dim, dim_h, m)
            del act
        else:
            _matmul(_BWD_DW2_GELU, grad_image, (1, dim), pre, (dim_h, 1), grad_w2, dim, dim_h, m, gelu_b=True)
    if need_b2:  # from the gathered copy where there is one, else gathering in the loads
        grad_b2 = (_column_sum(grad_image, m, None, torch.float32) if grad_image is not None
                   else _column_sum(grad_embeds, m, rows, torch.float32))  # fmt: skip
    del grad_image
    if grad_pre is not None:
        if need_w1:
            # d w1 [D_h, D_v] = d pre^T @ norm(x): A[i, t] = dpre[t, i]; B[t, j] = norm(x)[t, j].
            grad_w1 = torch.empty((dim_h, dim_v), dtype=torch.float32, device=x.device)
            _matmul(_BWD_DW1, grad_pre, (1, dim_h), x, (dim_v, 1), grad_w1, dim_h, dim_v, m, norm_b=norm)
        if need_normed:
            # d norm(x) [M, D_v] = d pre @ w1: B[k, n] = w1[k, n]; then the LayerNorm's backward.
            grad_x = torch.empty((m, dim_v), dtype=w1.dtype, device=x.device)
            _matmul(_BWD_DX, grad_pre, (dim_h, 1), w1, (dim_v, 1), grad_x, m, dim_v, dim_h)
            if norm is not None:
                grad_x, grad_norm_w, grad_norm_b = _layer_norm_backward(grad_x, x, norm, need_x)
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_norm_w, grad_norm_b


class _ProjectorScatterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeds, features, rows, w1, b1, w2, b2, norm_w, norm_b, norm_eps):
        dtype = compute_dtype(features)
        with torch.autocast(features.device.type, enabled=False):
            w1c, w2c = w1.to(dtype).contiguous(), w2.to(dtype).contiguous()
            norm = None
            if norm_w is None:
                x = features.to(dtype).contiguous()
            else:  # normalized in features' own dtype, as autocast runs layer_norm in float32
                x = features.contiguous()
                norm = _Norm(*_layer_norm_stats(x, norm_eps), norm_w.contiguous(),
                             None if norm_b is None else norm_b.contiguous())  # fmt: skip
            pre = _forward(embeds, x, rows, w1c, b1, w2c, b2, norm)
        ctx.mark_dirty(embeds)
        saved = (x, rows, w1c, w2c, pre) + (() if norm is None else (norm.mean, norm.rstd, norm.weight))
        ctx.save_for_backward(*saved, norm_b)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (features, w1, b1, w2, b2, norm_w, norm_b))
        return embeds

    @staticmethod
    def backward(ctx, grad_out):
        *saved, norm_b = ctx.saved_tensors
        x, rows, w1, w2, pre = saved[:5]
        norm = _Norm(*saved[5:], norm_b) if len(saved) > 5 else None
        need = ctx.needs_input_grad
        # (features, w1, b1, w2, b2, norm weight, norm bias): only the ones that exist and require grad
        needs = tuple(need[i] and dtype is not None for i, dtype in zip((1, 3, 4, 5, 6, 7, 8), ctx.dtypes))
        grad_out = grad_out.contiguous()
        with torch.autocast(grad_out.device.type, enabled=False):
            grads = _backward(grad_out, x, rows, w1, w2, pre, norm, needs)  # d embeds cast per tile in the loads
        grads = [g.to(dtype) if wanted else None for g, dtype, wanted in zip(grads, ctx.dtypes, needs)]
        grad_embeds = None
        if need[0]:  # the image rows were overwritten: no gradient flows to their old values
            grad_embeds = grad_out.index_fill(0, rows, 0)
        return (grad_embeds, grads[0], None, *grads[1:], None)


def _check_limits(embeds, features, rows, w1, b1, w2, b2, norm_w, norm_b, norm_eps) -> None:
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
    if norm_w is None and norm_b is not None:
        raise ValueError("projector_scatter_triton: norm_bias without norm_weight; pass both, or norm_weight alone")
    if norm_w is not None:
        if dim_v > MAX_ROW_DIM:
            raise ValueError(
                f"projector_scatter_triton: D_v={dim_v} > {MAX_ROW_DIM}, the widest row the LayerNorm kernels hold"
            )
        if not norm_eps > 0:
            raise ValueError(f"projector_scatter_triton: norm_eps={norm_eps!r} must be positive")
    for name, bias, size in (("fc1_bias", b1, dim_h), ("fc2_bias", b2, dim), ("norm_weight", norm_w, dim_v),
                             ("norm_bias", norm_b, dim_v)):  # fmt: skip
        if bias is not None and bias.shape != (size,):
            raise ValueError(f"projector_scatter_triton: {name} has shape {tuple(bias.shape)}, expected ({size},)")
    for name, tensor in (("embeds", embeds), ("features", features), ("fc1_weight", w1), ("fc2_weight", w2),
                         ("fc1_bias", b1), ("fc2_bias", b2), ("norm_weight", norm_w),
                         ("norm_bias", norm_b)):  # fmt: skip
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
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """Project ``features`` with the (LayerNorm +) 2-layer GELU MLP and write row m into ``embeds[rows[m]]``,
    fused; returns embeds.

    Arguments:
        embeds: (total, D) contiguous, the packed sequence buffer; updated in place (autograd sees an
            in-place op; the overwritten rows get no gradient, as with masked_scatter).
        features: (M, D_v), M = N_img * P image tokens in the order of ``rows``.
        rows: (M,) int32/int64, distinct, each in [0, total) (not checked on the device: the
            caller's image-token positions, e.g. ``(input_ids == image_token_id).nonzero()``).
        fc1_weight: (D_h, D_v); fc1_bias: (D_h,) or None; fc2_weight: (D, D_h); fc2_bias: (D,) or None.
        norm_weight, norm_bias: (D_v,) each, or None: a LayerNorm over D_v before fc1 (with norm_eps > 0)
            when norm_weight is given; D_v <= 65536 then.
    Returns:
        embeds. Differentiable in embeds, features and the parameters.

    float16, bfloat16 or float32 (mixed allowed); the GEMMs run in features' dtype, or autocast's when
    autocast is on (inputs cast once, as F.linear under autocast would), with float32 accumulation;
    bias, GELU (exact erf) and their gradients in float32; the LayerNorm's statistics, normalization
    and backward in float32 from features in their own dtype, the normalized rows rounded to the GEMM's
    dtype in its loads (where autocast would round F.layer_norm's float32 output); the projected rows are
    stored in embeds' dtype; parameter gradients accumulate in float32 over all M tokens and are rounded once. CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1 (tests only). Every limit raises ValueError.
    Tested in tests/vlm_core/kernels/test_fused_projector.py against a float64 reference
    (interpreter on the CPU; the GPU cases there, LLaVA-1.5 widths, were not run when this was written).
    """
    _check_limits(embeds, features, rows, fc1_weight, fc1_bias, fc2_weight, fc2_bias, norm_weight, norm_bias, norm_eps)
    return _ProjectorScatterFunction.apply(
        embeds, features, rows.contiguous(), fc1_weight, fc1_bias, fc2_weight, fc2_bias, norm_weight, norm_bias,
        float(norm_eps),
    )  # fmt: skip


def projector_scatter(
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
    impl: str = "reference",
) -> torch.Tensor:
    """embeds with rows[m] := projector(features[m]), through ``impl``: "triton" writes embeds in place,
    "reference" returns a new tensor. Use the returned tensor either way."""
    args = (embeds, features, rows, fc1_weight, fc1_bias, fc2_weight, fc2_bias, norm_weight, norm_bias, norm_eps)
    if impl == "triton":
        return projector_scatter_triton(*args)
    if impl == "reference":
        return projector_scatter_reference(*args)
    raise ValueError(f"projector_scatter: unknown impl={impl!r}; expected 'reference' or 'triton'")


def fusable_projector_problem(projector: nn.Module) -> str:
    """Why ``projector`` cannot run fused ("" if it can): it needs plain ``fc1``/``fc2`` nn.Linear layers
    (a tensor-parallel projector, say, shards them and needs its own collectives), and a ``norm`` that is
    None or an nn.LayerNorm with a weight over the last dim."""
    for name in ("fc1", "fc2"):
        layer = getattr(projector, name, None)
        if type(layer) is not nn.Linear:
            return f"projector.{name} is {type(layer).__name__}, not a plain nn.Linear"
    norm = getattr(projector, "norm", None)
    plain_norm = type(norm) is nn.LayerNorm and norm.weight is not None and norm.weight.dim() == 1
    if norm is not None and not plain_norm:
        return f"projector.norm is {type(norm).__name__} without a weight over the last dim, not a plain nn.LayerNorm"
    return ""


def projector_module_scatter(projector: nn.Module, features: torch.Tensor, embeds: torch.Tensor, rows: torch.Tensor):
    """:func:`projector_scatter_triton` with the parameters of ``projector`` (``norm``: None or nn.LayerNorm,
    ``fc1``, ``fc2``; see :func:`fusable_projector_problem`); features [M, D_v]; returns embeds."""
    norm = getattr(projector, "norm", None)
    fc1, fc2 = projector.fc1, projector.fc2
    norm_args = () if norm is None else (norm.weight, norm.bias, norm.eps)
    return projector_scatter_triton(embeds, features, rows, fc1.weight, fc1.bias, fc2.weight, fc2.bias, *norm_args)


class FusedProjector(nn.Module):
    """(LayerNorm) -> Linear(D_v -> D_h) -> GELU -> Linear(D_h -> D), fused and scattered into the packed buffer.

    State dict: that of ``vlm_core.model.projector.Projector`` built with the same ``layer_norm``
    (``fc1.*``, ``fc2.*``, plus ``norm.*`` with a LayerNorm); checkpoints load in either direction.

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
        dim_v = features.shape[-1]
        flat = features.reshape(-1, dim_v)  # [M, D_v]
        if embeds is None:
            out = torch.empty((flat.shape[0], self.fc2.out_features), dtype=compute_dtype(flat), device=flat.device)
            out = projector_module_scatter(self, flat, out, torch.arange(flat.shape[0], device=flat.device))
            return out.view(*features.shape[:-1], self.fc2.out_features)
        if rows is None:
            raise ValueError("FusedProjector: pass rows (the packed image-token positions) together with embeds")
        return projector_module_scatter(self, flat, embeds, rows)


__all__ = [
    "FusedProjector",
    "fusable_projector_problem",
    "projector_module_scatter",
    "projector_reference",
    "projector_scatter",
    "projector_scatter_reference",
    "projector_scatter_triton",
]
