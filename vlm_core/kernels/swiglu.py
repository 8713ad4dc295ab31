"""SwiGLU's gate: ``silu(gate) * up``, as a fused Triton forward and backward.

Layers, as in STYLE.md: the plain-PyTorch reference (:func:`swiglu_reference`, the specification, as
``vlm_core.model.decoder.SwiGLU`` computes it between its projections), private kernels (plain
functions, decorated on first use), launchers, an autograd Function, the public :func:`swiglu`, and the
thin :class:`FusedSwiGLU` module (the decoder's three projections around the fused gate, with the
decoder SwiGLU's state dict).

Fused: the forward reads gate and up once and writes y (eager: silu writes an intermediate, the
product reads it back). The backward recomputes sigmoid(gate) from gate instead of saving silu's
output, and writes both input gradients in one pass (eager autograd: four elementwise kernels).
The projections stay cuBLAS GEMMs.
"""

from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

# _cast is a device helper the kernels call; make_jit decorates it with them.
from vlm_core.kernels.triton_runtime import (
    _cast,
    check_can_run,
    check_dtype,
    interpret_bf16,
    interpreting,
    make_jit,
)

if TYPE_CHECKING:
    import triton.language as tl  # noqa: TC004  (kernels get the real module as a global from make_jit)

_BLOCK = 1024  # elements per program; an elementwise kernel, bandwidth-bound at any block >= 512
_NUM_WARPS = 4


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., H] -> silu(gate) * up [..., H]; the specification (any device and dtype)."""
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------
# Kernels. Plain functions here; _kernels() compiles them with triton.jit on first use.
# --------------------------------------------------------------------------------------------


def _swiglu_fwd_kernel(Gate, Up, Y, n_elements, BLOCK: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """y = g * sigmoid(g) * u, in float32, rounded once to y's dtype."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    g = tl.load(Gate + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Up + offsets, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offsets, _cast(y, Y.dtype.element_ty, INTERPRET_BF16), mask=mask)


def _swiglu_bwd_kernel(
    DY, Gate, Up, DGate, DUp, n_elements, BLOCK: tl.constexpr, INTERPRET_BF16: tl.constexpr
):
    """dgate = dy * u * s * (1 + g * (1 - s)) with s = sigmoid(g);  dup = dy * g * s."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(Gate + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Up + offsets, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(DGate + offsets, _cast(dgate, DGate.dtype.element_ty, INTERPRET_BF16), mask=mask)
    tl.store(DUp + offsets, _cast(dy * silu, DUp.dtype.element_ty, INTERPRET_BF16), mask=mask)


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    """The kernels decorated for one mode (interpreter or GPU); see triton_runtime.make_jit."""
    _, jit = make_jit(__name__)
    return types.SimpleNamespace(forward=jit(_swiglu_fwd_kernel), backward=jit(_swiglu_bwd_kernel))


# --------------------------------------------------------------------------------------------
# Launchers, autograd, public function
# --------------------------------------------------------------------------------------------


def _grid(n_elements: int) -> tuple[int]:
    return ((n_elements + _BLOCK - 1) // _BLOCK,)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        n_elements = gate.numel()
        if n_elements:
            bf16 = any(interpret_bf16(t.dtype) for t in (gate, up, y))
            _kernels(interpreting()).forward[_grid(n_elements)](
                gate, up, y, n_elements, BLOCK=_BLOCK, INTERPRET_BF16=bf16, num_warps=_NUM_WARPS
            )
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n_elements = gate.numel()
        if n_elements:
            bf16 = any(interpret_bf16(t.dtype) for t in (dy, gate, up))
            _kernels(interpreting()).backward[_grid(n_elements)](
                dy, gate, up, dgate, dup, n_elements, BLOCK=_BLOCK, INTERPRET_BF16=bf16, num_warps=_NUM_WARPS
            )
        return dgate, dup


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up as fused Triton kernels; same contract as :func:`swiglu_reference`.

    Arguments:
        gate, up: (..., H), one shape, float16, bfloat16 or float32 (may differ), one device.
    Returns:
        (..., H) in torch.promote_types(gate.dtype, up.dtype). Differentiable in gate and up.

    Computed in float32 and rounded once (the eager reference rounds silu(gate) to the input dtype
    first). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests only). Every limit raises
    ValueError. Tested in tests/vlm_core/kernels/test_swiglu.py against a float64 truth (interpreter
    on the CPU; the GPU cases there were not run when this was written).
    """
    check_can_run("swiglu_triton", gate.device)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu_triton: gate has shape {tuple(gate.shape)} but up has {tuple(up.shape)}; they must match")
    for name, tensor in (("gate", gate), ("up", up)):
        check_dtype("swiglu_triton", name, tensor)
    if gate.device != up.device:
        raise ValueError(f"swiglu_triton: gate is on {gate.device} but up on {up.device}")
    return _SwiGLUFunction.apply(gate.contiguous(), up.contiguous())


SWIGLU_IMPLS = {"reference": swiglu_reference, "triton": swiglu_triton}


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "reference") -> torch.Tensor:
    """silu(gate) * up through ``impl`` ("reference" or "triton")."""
    if impl not in SWIGLU_IMPLS:
        raise ValueError(f"swiglu: unknown impl={impl!r}; expected one of {sorted(SWIGLU_IMPLS)}")
    return SWIGLU_IMPLS[impl](gate, up)


class FusedSwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with the fused gate; the state dict of decoder.SwiGLU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu_triton(self.gate_proj(x), self.up_proj(x)))


__all__ = ["SWIGLU_IMPLS", "FusedSwiGLU", "swiglu", "swiglu_reference", "swiglu_triton"]
