"""RMSNorm: ``x / rms(x) * weight`` over the last dim, as a fused Triton forward and backward.

Layers, as in STYLE.md: the plain-PyTorch reference (:func:`rmsnorm_reference`, the specification and
exactly the math of ``vlm_core.model.decoder.RMSNorm``), private kernels (plain functions, decorated
on first use by :func:`_kernels`), launchers, an autograd Function, the public :func:`rmsnorm` and the
thin :class:`FusedRMSNorm` module.

Fused: the forward reads x once and writes y and one float32 rstd per row (the eager reference makes
a float32 copy of x, squares it, reduces, scales, rounds, multiplies: ~6 passes over [N, D]). The
backward reads x, dy and rstd once and writes dx plus per-program float32 partial sums of dweight
(summed by one small torch reduction), instead of autograd's chain of elementwise kernels.
"""

from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING

import torch
from torch import nn

# _cast is a device helper the kernels call; make_jit decorates it with them.
from vlm_core.kernels.triton_runtime import (
    MAX_ROW_DIM,
    _cast,
    check_can_run,
    check_dtype,
    interpret_bf16,
    interpreting,
    make_jit,
    reduction_programs,
    row_launch_settings,
)

if TYPE_CHECKING:
    import triton.language as tl  # noqa: TC004  (kernels get the real module as a global from make_jit)

MAX_DIM = MAX_ROW_DIM


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D]: x32 * rsqrt(mean(x32^2) + eps), rounded to x's dtype, times weight.

    The specification; any device and dtype. Identical to ``vlm_core.model.decoder.RMSNorm.forward``.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


# --------------------------------------------------------------------------------------------
# Kernels. Plain functions here; _kernels() compiles them with triton.jit on first use.
# --------------------------------------------------------------------------------------------


def _rmsnorm_fwd_kernel(
    X,
    W,
    Y,
    Rstd,
    n_rows,
    dim,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    """One program = BLOCK_M whole rows. Statistics in float32; normed rounded to x's dtype as the reference."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < dim)
    offsets = rows[:, None].to(tl.int64) * dim + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / dim + eps)  # [BLOCK_M]
    normed = _cast(x * rstd[:, None], X.dtype.element_ty, INTERPRET_BF16).to(tl.float32)
    w = tl.load(W + cols, mask=cols < dim, other=0.0).to(tl.float32)
    tl.store(Y + offsets, _cast(normed * w[None, :], Y.dtype.element_ty, INTERPRET_BF16), mask=mask)
    tl.store(Rstd + rows, rstd, mask=row_ok)


def _norm_bwd_kernel(
    DY,
    X,
    W,
    Mean,
    Rstd,
    DX,
    DWPartial,
    DBPartial,
    n_rows,
    dim,
    LAYER_NORM: tl.constexpr,
    WANT_DX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    """Grid-stride over row blocks: dx per row, and this program's float32 partial sums of the parameter
    gradients (rows DWPartial[pid], DBPartial[pid]). DY, X and DX are [n_rows, dim] contiguous; DX may be
    DY (each element is read before it is written). With g = dy * w:

    - RMSNorm (this module's): xhat = x * rstd, dx = rstd * (g - xhat * mean(g * xhat)), dweight = sum of
      dy * round(xhat) (the reference multiplies the normed row rounded to x's dtype by w); Mean and
      DBPartial are not read.
    - LAYER_NORM (F.layer_norm's, for the fused projector): xhat = (x - mean) * rstd,
      dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dweight = sum of dy * xhat, dbias = sum of dy.
    """
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_D], tl.float32)
    for start in range(pid * BLOCK_M, n_rows, step):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None].to(tl.int64) * dim + cols[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        if LAYER_NORM:
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            dw += tl.sum(dy * xhat, 0)
            db += tl.sum(dy, 0)
        else:
            xhat = x * rstd[:, None]
            dw += tl.sum(dy * _cast(xhat, X.dtype.element_ty, INTERPRET_BF16).to(tl.float32), 0)
        if WANT_DX:
            g = dy * w[None, :]
            dx = g - xhat * (tl.sum(g * xhat, 1) / dim)[:, None]
            if LAYER_NORM:
                dx -= (tl.sum(g, 1) / dim)[:, None]
            tl.store(DX + offsets, _cast(rstd[:, None] * dx, DX.dtype.element_ty, INTERPRET_BF16), mask=mask)
    tl.store(DWPartial + pid * dim + cols, dw, mask=col_ok)
    if LAYER_NORM:
        tl.store(DBPartial + pid * dim + cols, db, mask=col_ok)


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    """The kernels decorated for one mode (interpreter or GPU); see triton_runtime.make_jit."""
    _, jit = make_jit(__name__)
    return types.SimpleNamespace(forward=jit(_rmsnorm_fwd_kernel), backward=jit(_norm_bwd_kernel))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d [N, D] contiguous -> y [N, D] in promote(x, weight) dtype, rstd [N] float32."""
    import triton

    n_rows, dim = x2d.shape
    out_dtype = torch.promote_types(x2d.dtype, weight.dtype)
    y = torch.empty((n_rows, dim), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block_m, block_d, num_warps = row_launch_settings(dim)
    bf16 = interpret_bf16(x2d.dtype) or interpret_bf16(out_dtype)
    _kernels(interpreting()).forward[(triton.cdiv(n_rows, block_m),)](
        x2d, weight, y, rstd, n_rows, dim, eps,
        BLOCK_M=block_m, BLOCK_D=block_d, INTERPRET_BF16=bf16, num_warps=num_warps,
    )  # fmt: skip
    return y, rstd


def _backward(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx [N, D] in x's dtype and dweight [D] in weight's dtype."""
    import triton

    n_rows, dim = x2d.shape
    dx = torch.empty_like(x2d)
    block_m, block_d, num_warps = row_launch_settings(dim)
    programs = reduction_programs(triton.cdiv(n_rows, block_m), x2d.device)
    partial = torch.empty((programs, dim), dtype=torch.float32, device=x2d.device)
    bf16 = interpret_bf16(x2d.dtype) or interpret_bf16(dy.dtype)
    _kernels(interpreting()).backward[(programs,)](
        dy, x2d, weight, rstd, rstd, dx, partial, partial, n_rows, dim, LAYER_NORM=False, WANT_DX=True,
        BLOCK_M=block_m, BLOCK_D=block_d, INTERPRET_BF16=bf16, num_warps=num_warps,
    )  # fmt: skip
    return dx, partial.sum(0).to(weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, eps):
        y, rstd = _forward(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dx, dweight = _backward(dy.contiguous(), x2d, weight, rstd)
        return dx, (dweight if ctx.needs_input_grad[1] else None), None


def _check_limits(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_can_run("rmsnorm_triton", x.device)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"rmsnorm_triton: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"rmsnorm_triton: weight has shape {tuple(weight.shape)}, expected ({dim},) (x's last dim)")
    for name, tensor in (("x", x), ("weight", weight)):
        check_dtype("rmsnorm_triton", name, tensor)
    if weight.device != x.device:
        raise ValueError(f"rmsnorm_triton: x is on {x.device} but weight on {weight.device}")
    if dim > MAX_DIM:
        raise ValueError(f"rmsnorm_triton: last dim {dim} > {MAX_DIM}, the widest row one program holds")
    if not eps > 0:
        raise ValueError(f"rmsnorm_triton: eps={eps!r} must be positive")


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as fused Triton kernels; same contract and rounding as :func:`rmsnorm_reference`.

    Arguments:
        x: (..., D) float16, bfloat16 or float32; D <= 65536.
        weight: (D,) float16, bfloat16 or float32, on x's device.
        eps: > 0.
    Returns:
        (..., D) in torch.promote_types(x.dtype, weight.dtype). Differentiable in x and weight.

    Statistics and gradients are computed in float32; the normalized row is rounded to x's dtype
    before the weight multiply, as the reference does. Runs on CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1 (tests only). Every limit raises ValueError. Tested in
    tests/vlm_core/kernels/test_rmsnorm.py against the reference in float64 (interpreter on the CPU:
    float32, bfloat16, float16 at D 1..203; the GPU cases there were not run when this was written).
    """
    _check_limits(x, weight, eps)
    dim = x.shape[-1]
    y = _RMSNormFunction.apply(x.reshape(-1, dim).contiguous(), weight.contiguous(), float(eps))
    return y.view(*x.shape[:-1], dim)


RMSNORM_IMPLS = {"reference": rmsnorm_reference, "triton": rmsnorm_triton}


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "reference") -> torch.Tensor:
    """RMSNorm through ``impl`` ("reference" or "triton"); see :func:`rmsnorm_triton` for the contract."""
    if impl not in RMSNORM_IMPLS:
        raise ValueError(f"rmsnorm: unknown impl={impl!r}; expected one of {sorted(RMSNORM_IMPLS)}")
    return RMSNORM_IMPLS[impl](x, weight, eps)


class FusedRMSNorm(nn.Module):
    """RMSNorm whose forward and backward are the Triton kernels; the state dict of decoder.RMSNorm (``weight``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm_triton(x, self.weight, self.eps)


__all__ = ["RMSNORM_IMPLS", "FusedRMSNorm", "rmsnorm", "rmsnorm_reference", "rmsnorm_triton"]
