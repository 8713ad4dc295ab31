"""Rotary position embeddings (RoPE, rotate-half layout) applied in place to q and k of a packed batch.

Layers, as in STYLE.md: the plain-PyTorch reference (:func:`rope_reference`, the specification: exactly
``vlm_core.model.decoder.apply_rotary`` on q and on k), private kernels (plain functions, decorated on
first use), a launcher, an autograd Function that marks q and k dirty, and the public :func:`rope_`.

Packed positions: every token carries its own angles. Either ``cos``/``sin`` already hold one row per
token (``[total, Dh]``, as the decoder gathers them once per batch from its tables with the packed
``position_ids`` that restart per sample), or they are the tables themselves (``[S, Dh]``) and
``position_ids`` (``[total]``) picks each token's row inside the kernel.

Fused: one program rotates BLOCK_N tokens of every head, loading each token's cos/sin once for all
heads and writing the result over the input (eager: a float32 copy, a split, a concatenation, two
products and a sum per tensor, and new tensors). Without autograd (inference, the KV-cache prefill)
one launch rotates q and k together; with autograd q and k get one launch each (see _RopeFunction).
The backward is the same kernel rotating the incoming gradients by the negative angles.
"""

from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING

import torch

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

MAX_HEAD_DIM = 512
_BLOCK_N = 16  # tokens per program; each program loops over the heads of q and of k


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, Dh] rotated by per-token angles cos, sin [N, Dh]; math in fp32, result in x's dtype.

    The specification, identical to ``vlm_core.model.decoder.apply_rotary``: dimension pairs are
    (d, d + Dh/2).
    """
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)  # each [N, H, Dh/2]
    rotated = torch.cat([-second, first], dim=-1)  # [N, H, Dh]
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated q, rotated k) as new tensors; with ``position_ids``, cos/sin are tables indexed by it."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]  # [N, Dh] each
    return rotate_reference(q, cos, sin), rotate_reference(k, cos, sin)


# --------------------------------------------------------------------------------------------
# Kernel. A plain function here; _kernels() compiles it with triton.jit on first use.
# --------------------------------------------------------------------------------------------


def _rotate_heads(
    In,
    Out,
    stride_in_n,
    stride_in_h,
    stride_out_n,
    stride_out_h,
    num_heads,
    tokens,
    token_ok,
    half_cols,
    col_ok,
    c1,
    c2,
    s1,
    s2,
    HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    """Rotate every head of BLOCK_N tokens: [x1, x2] -> [x1 c1 - x2 s1, x2 c2 + x1 s2] (backward: the transpose)."""
    mask = token_ok[:, None] & col_ok[None, :]
    in_rows = tokens[:, None].to(tl.int64) * stride_in_n + half_cols[None, :]
    out_rows = tokens[:, None].to(tl.int64) * stride_out_n + half_cols[None, :]
    for head in range(num_heads):
        in_base = In + head * stride_in_h + in_rows
        out_base = Out + head * stride_out_h + out_rows
        x1 = tl.load(in_base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(in_base + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # dx1 = dy1 c1 + dy2 s2;  dx2 = dy2 c2 - dy1 s1
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:  # the reference's x * cos + rotate_half(x) * sin, term by term
            y1 = x1 * c1 + (-x2) * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(out_base, _cast(y1, Out.dtype.element_ty, INTERPRET_BF16), mask=mask)
        tl.store(out_base + HALF, _cast(y2, Out.dtype.element_ty, INTERPRET_BF16), mask=mask)


def _rope_kernel(
    QIn,
    KIn,
    QOut,
    KOut,
    Cos,
    Sin,
    Pos,
    total,
    num_q_heads,
    num_kv_heads,
    stride_qin_n,
    stride_qin_h,
    stride_kin_n,
    stride_kin_h,
    stride_qout_n,
    stride_qout_h,
    stride_kout_n,
    stride_kout_h,
    stride_table,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_POSITIONS: tl.constexpr,
    BACKWARD: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    """One program = BLOCK_N tokens, all q and k heads; cos/sin rows loaded once per token."""
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = tokens < total
    half_cols = tl.arange(0, BLOCK_HALF)
    col_ok = half_cols < HALF
    if HAS_POSITIONS:
        table_rows = tl.load(Pos + tokens, mask=token_ok, other=0).to(tl.int64)
    else:
        table_rows = tokens.to(tl.int64)
    angle_mask = token_ok[:, None] & col_ok[None, :]
    angle_offsets = table_rows[:, None] * stride_table + half_cols[None, :]
    c1 = tl.load(Cos + angle_offsets, mask=angle_mask, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + angle_offsets + HALF, mask=angle_mask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + angle_offsets, mask=angle_mask, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + angle_offsets + HALF, mask=angle_mask, other=0.0).to(tl.float32)
    _rotate_heads(
        QIn, QOut, stride_qin_n, stride_qin_h, stride_qout_n, stride_qout_h, num_q_heads,
        tokens, token_ok, half_cols, col_ok, c1, c2, s1, s2, HALF, BACKWARD, INTERPRET_BF16,
    )  # fmt: skip
    _rotate_heads(
        KIn, KOut, stride_kin_n, stride_kin_h, stride_kout_n, stride_kout_h, num_kv_heads,
        tokens, token_ok, half_cols, col_ok, c1, c2, s1, s2, HALF, BACKWARD, INTERPRET_BF16,
    )  # fmt: skip


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    """The kernel decorated for one mode (interpreter or GPU); see triton_runtime.make_jit."""
    _, jit = make_jit(__name__)
    jit(_rotate_heads)
    return types.SimpleNamespace(rope=jit(_rope_kernel))


# --------------------------------------------------------------------------------------------
# Launcher, autograd, public function
# --------------------------------------------------------------------------------------------


def _launch(q_in, k_in, q_out, k_out, cos, sin, position_ids, backward: bool) -> None:
    """Rotate q_in, k_in into q_out, k_out (the same tensors for the in-place forward)."""
    total, num_q_heads, head_dim = q_in.shape
    if total == 0:
        return
    half = head_dim // 2
    bf16 = any(interpret_bf16(t.dtype) for t in (q_in, k_in))
    positions = position_ids if position_ids is not None else cos  # any pointer; unused without positions
    _kernels(interpreting()).rope[((total + _BLOCK_N - 1) // _BLOCK_N,)](
        q_in, k_in, q_out, k_out, cos, sin, positions, total, num_q_heads, k_in.shape[1],
        q_in.stride(0), q_in.stride(1), k_in.stride(0), k_in.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0),
        HALF=half, BLOCK_HALF=max(16, 1 << (half - 1).bit_length()), BLOCK_N=_BLOCK_N,
        HAS_POSITIONS=position_ids is not None, BACKWARD=backward, INTERPRET_BF16=bf16, num_warps=4,
    )  # fmt: skip


class _RopeFunction(torch.autograd.Function):
    """Rotates one tensor in place. (Autograd cannot let one Function modify two views in place and
    return both, and q, k are views of the projections' outputs; so q and k get one apply each.)"""

    @staticmethod
    def forward(ctx, x, cos, sin, position_ids):
        _launch(x, x[:, :0], x, x[:, :0], cos, sin, position_ids, backward=False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, position_ids)
        return x

    @staticmethod
    def backward(ctx, dx):
        cos, sin, position_ids = ctx.saved_tensors
        dx_in = dx.contiguous()
        dx_out = torch.empty_like(dx_in)
        _launch(dx_in, dx_in[:, :0], dx_out, dx_out[:, :0], cos, sin, position_ids, backward=True)
        return dx_out, None, None, None


def _check_limits(q, k, cos, sin, position_ids) -> None:
    check_can_run("rope_triton", q.device)
    for name, tensor in (("q", q), ("k", k)):
        if tensor.dim() != 3:
            raise ValueError(f"rope_triton: {name} must be 3-d (total, heads, head_dim), got {tuple(tensor.shape)}")
        check_dtype("rope_triton", name, tensor)
        if tensor.stride(-1) != 1:
            raise ValueError(
                f"rope_triton: {name} has stride {tensor.stride(-1)} in its last dim; rotating in place needs "
                "unit stride there (q_proj(x).view(total, heads, head_dim) has it)"
            )
    total, _, head_dim = q.shape
    if k.shape[0] != total or k.shape[2] != head_dim:
        raise ValueError(f"rope_triton: k has shape {tuple(k.shape)}, q {tuple(q.shape)}; tokens and head_dim must match")
    if head_dim % 2 or not 2 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"rope_triton: head_dim={head_dim} must be even and in [2, {MAX_HEAD_DIM}]")
    rows = total if position_ids is None else None
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != head_dim or table.stride(1) != 1:
            raise ValueError(
                f"rope_triton: {name} must be 2-d (rows, head_dim={head_dim}) with unit stride in its last dim, "
                f"got shape {tuple(table.shape)}"
            )
        if rows is not None and table.shape[0] != rows:
            raise ValueError(
                f"rope_triton: {name} has {table.shape[0]} rows but q has {total} tokens; pass one row per token, "
                "or the tables with position_ids"
            )
        if table.requires_grad:
            raise ValueError(f"rope_triton: {name} requires grad; the kernel gives no gradient for the angles")
        if table.device != q.device:
            raise ValueError(f"rope_triton: {name} is on {table.device}, q on {q.device}")
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ValueError(f"rope_triton: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one layout")
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"rope_triton: q ({q.dtype}, {q.device}) and k ({k.dtype}, {k.device}) differ")
    if position_ids is not None and (
        position_ids.shape != (total,) or position_ids.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"rope_triton: position_ids must be ({total},) int32 or int64, got {tuple(position_ids.shape)} "
            f"{position_ids.dtype}"
        )


def rope_triton_(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place with one fused Triton kernel; returns (q, k).

    Arguments:
        q: (total, Hq, Dh); k: (total, Hkv, Dh); one float dtype (float16, bfloat16, float32), unit
            stride in Dh (token and head strides are free). Dh even, <= 512.
        cos, sin: (total, Dh) float32 per-token rows; or, with ``position_ids``, tables (S, Dh) with
            every position id < S (not checked on the device: an id past the table reads out of bounds).
        position_ids: None, or (total,) int32/int64 packed positions (restarting per sample).
    Returns:
        (q, k), the same tensors, rotated; differentiable in q and k (autograd sees an in-place op,
        so q and k must not be needed unrotated by anything else in the graph).

    Math in float32, rounded once to q's dtype, term by term as the reference. CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1 (tests only). Every limit raises ValueError. Tested in
    tests/vlm_core/kernels/test_rope.py against the reference (interpreter on the CPU; the GPU cases
    there were not run when this was written).
    """
    _check_limits(q, k, cos, sin, position_ids)
    cos, sin = cos.contiguous(), sin.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _RopeFunction.apply(q, cos, sin, position_ids), _RopeFunction.apply(k, cos, sin, position_ids)
    _launch(q, k, q, k, cos, sin, position_ids, backward=False)  # no graph: one launch rotates both
    return q, k


def _rope_reference_(q, k, cos, sin, position_ids=None):
    return rope_reference(q, k, cos, sin, position_ids)


ROPE_IMPLS = {"reference": _rope_reference_, "triton": rope_triton_}


def rope_(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    impl: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k) through ``impl``: "triton" rotates in place, "reference" returns new tensors.

    Use the returned tensors either way.
    """
    if impl not in ROPE_IMPLS:
        raise ValueError(f"rope_: unknown impl={impl!r}; expected one of {sorted(ROPE_IMPLS)}")
    return ROPE_IMPLS[impl](q, k, cos, sin, position_ids)


__all__ = ["ROPE_IMPLS", "rope_", "rope_reference", "rope_triton_", "rotate_reference"]
