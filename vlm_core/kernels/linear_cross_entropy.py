"""LM head + cross-entropy without the full ``[tokens, vocab]`` logits: chunked, gradients in the same pass.

Layers, as in STYLE.md: the plain-PyTorch reference (:func:`linear_cross_entropy_reference`, the
specification and the loss of ``vlm_core.train.lm.lm_loss``), a private Triton kernel (a plain
function, decorated on first use), the chunk loop, an autograd Function, the public
:func:`linear_cross_entropy` and the thin :class:`FusedLinearCrossEntropy` module.

How (the Liger-Kernel scheme): tokens are cut into chunks. For each chunk the logits ``[C, V]`` are
one GEMM in the compute dtype; one Triton program per row then makes two passes over its logits
(online max and sum of exponentials, then ``softmax - one_hot``, scaled by the token's weight) and
writes that gradient over the logits in place, with the token's loss. Two more GEMMs turn the chunk's
logit gradient into its rows of ``d hidden`` and its share of ``d weight`` (accumulated in float32).
The forward therefore already holds both gradients; the backward only scales them by the incoming
scalar gradient. Peak memory is one chunk of logits plus the float32 ``d weight`` instead of several
``[N, V]`` float32 tensors (logits, their float copy, log-softmax, its gradient).
"""

from __future__ import annotations

import functools
import logging
import types
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

# _cast is a device helper the kernel calls; make_jit decorates it with it.
from vlm_core.kernels.triton_runtime import (
    _cast,
    check_can_run,
    check_dtype,
    compute_dtype,
    interpret_bf16,
    interpreting,
    make_jit,
)

if TYPE_CHECKING:
    import triton.language as tl  # noqa: TC004  (kernels get the real module as a global from make_jit)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # PyTorch's default; vlm_core.types.IGNORE_INDEX has the same value
# Default chunk: as many tokens as fit 1 GiB of logits in the compute dtype (V=151,936 in bf16: 3,534
# tokens, so a 16k-token batch runs in 5 chunks). Fewer, larger chunks cost less float32 d-weight
# accumulation traffic (one [V, D] read-add-write per chunk). Not yet swept on a GPU.
_CHUNK_BYTES = 1 << 30


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """sum_i token_weight[i] * CE(hidden[i] @ weight.T, labels[i]); a float32 scalar.

    The specification, as ``lm_loss`` computes it: logits in the inputs' dtype (autocast's when it is
    on), cross-entropy in float32; tokens labelled ``ignore_index`` add nothing.
    """
    logits = F.linear(hidden, weight)  # [N, V]
    token_loss = F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=ignore_index)  # [N]
    if token_weight is not None:
        token_loss = token_loss * token_weight
    return token_loss.sum()


# --------------------------------------------------------------------------------------------
# Kernel. A plain function here; _kernels() compiles it with triton.jit on first use.
# --------------------------------------------------------------------------------------------


def _cross_entropy_rows_kernel(
    Logits,
    Labels,
    TokenWeight,
    Loss,
    stride_row,
    n_vocab,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    """One program = one row: loss = w * (logsumexp(x) - x[label]); with COMPUTE_GRAD, x := w * (softmax(x) - onehot)."""
    row = tl.program_id(0)
    base = Logits + row.to(tl.int64) * stride_row
    label = tl.load(Labels + row)
    ignored = label == ignore_index
    weight = 1.0
    if HAS_WEIGHT:
        weight = tl.load(TokenWeight + row).to(tl.float32)
    weight = tl.where(ignored, 0.0, weight)

    # Pass 1: online max and sum of exponentials (float32), as in flash-attention's softmax.
    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.zeros([], tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    safe_label = tl.where(ignored, 0, label)
    target = tl.load(base + safe_label).to(tl.float32)
    tl.store(Loss + row, tl.where(ignored, 0.0, (lse - target) * weight))

    if COMPUTE_GRAD:
        # Pass 2: d loss / d logits, written over the logits.
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            col_ok = cols < n_vocab
            x = tl.load(base + cols, mask=col_ok, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == safe_label, 1.0, 0.0)
            tl.store(base + cols, _cast(grad * weight, Logits.dtype.element_ty, INTERPRET_BF16), mask=col_ok)


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    """The kernel decorated for one mode (interpreter or GPU); see triton_runtime.make_jit."""
    _, jit = make_jit(__name__)
    return types.SimpleNamespace(rows=jit(_cross_entropy_rows_kernel))


# --------------------------------------------------------------------------------------------
# The chunk loop, autograd, public function
# --------------------------------------------------------------------------------------------


def default_chunk_tokens(n_vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so that one chunk's logits take ~1 GiB (a multiple of 128 when that is >= 128)."""
    tokens = max(1, _CHUNK_BYTES // (n_vocab * torch.finfo(dtype).bits // 8))
    return tokens - tokens % 128 if tokens >= 128 else tokens


@functools.cache
def _half_mm_has_fp32_output(device_type: str) -> bool:
    """Does torch.mm(a, b, out_dtype=torch.float32) run for half-precision a, b on this device type?

    It does on CUDA in recent torch (cuBLAS with a float32 C); this CPU build has no kernel for it.
    """
    device = torch.device(device_type)
    a = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError) as error:  # NotImplementedError is a RuntimeError
        if device_type == "cuda":
            log.info("linear_cross_entropy: torch %s has no half x half -> float32 mm on cuda (%s); the gradient "
                     "GEMMs round to the half dtype before the float32 accumulation", torch.__version__,
                     str(error).splitlines()[0][:120])
        return False
    return True


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with float32 accumulation and a float32 result, rounded once (from the products' exact sums)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if _half_mm_has_fp32_output(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)
    if a.device.type == "cpu":  # the interpreter's tests: products of half values are exact in float32
        return torch.mm(a.float(), b.float())
    return torch.mm(a, b).float()


def _chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weight: torch.Tensor | None,
    ignore_index: int,
    chunk_tokens: int,
    need_hidden_grad: bool,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, d loss / d hidden, d loss / d weight) with the gradients float32 (or None when not needed).

    hidden, weight are in the compute dtype. The gradients stay float32 until the backward scales them
    and rounds them once to the inputs' dtypes: rounding here too would round twice.
    """
    n_tokens, _ = hidden.shape
    n_vocab = weight.shape[0]
    loss = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
    compute_grad = need_hidden_grad or need_weight_grad
    kernel = _kernels(interpreting()).rows
    bf16 = interpret_bf16(hidden.dtype)
    block_v = min(1 << (n_vocab - 1).bit_length(), 1024 if interpreting() else 8192)
    for start in range(0, n_tokens, chunk_tokens):
        end = min(start + chunk_tokens, n_tokens)
        hidden_chunk = hidden[start:end]  # [C, D]
        logits = hidden_chunk @ weight.T  # [C, V], the only logits alive at a time
        kernel[(end - start,)](
            logits, labels[start:end], token_weight[start:end] if token_weight is not None else loss,
            loss[start:end], logits.stride(0), n_vocab, ignore_index,
            BLOCK_V=block_v, HAS_WEIGHT=token_weight is not None, COMPUTE_GRAD=compute_grad,
            INTERPRET_BF16=bf16, num_warps=8,
        )  # fmt: skip
        # logits now hold d loss / d logits of the chunk, in the compute dtype (as the unfused
        # backward rounds its float32 softmax gradient before the GEMMs).
        if need_hidden_grad:
            grad_hidden[start:end] = _mm_fp32(logits, weight)  # [C, D]
        if need_weight_grad:
            if logits.dtype == torch.float32:
                grad_weight.addmm_(logits.T, hidden_chunk)  # [V, D]
            else:
                grad_weight += _mm_fp32(logits.T, hidden_chunk)  # [V, D] float32 temporary
        del logits
    return loss.sum(), grad_hidden, grad_weight


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weight, ignore_index, chunk_tokens):
        dtype = compute_dtype(hidden)
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[:2]  # False under no_grad
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_hidden, grad_weight = _chunked_forward(
                hidden.to(dtype), weight.to(dtype), labels, token_weight, ignore_index,
                chunk_tokens or default_chunk_tokens(weight.shape[0], dtype), need_hidden_grad, need_weight_grad,
            )  # fmt: skip
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_loss).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _check_limits(hidden, weight, labels, token_weight, chunk_tokens) -> None:
    check_can_run("linear_cross_entropy_triton", hidden.device)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy_triton: hidden {tuple(hidden.shape)} must be (N, D) and weight "
            f"{tuple(weight.shape)} (V, D) with the same D"
        )
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        check_dtype("linear_cross_entropy_triton", name, tensor)
    n_tokens, n_vocab = hidden.shape[0], weight.shape[0]
    if not 1 <= n_vocab < 2**31:
        raise ValueError(f"linear_cross_entropy_triton: vocabulary size {n_vocab} must be in [1, 2**31)")
    if labels.shape != (n_tokens,) or labels.dtype != torch.int64:
        raise ValueError(
            f"linear_cross_entropy_triton: labels must be ({n_tokens},) int64, got {tuple(labels.shape)} {labels.dtype}"
        )
    if token_weight is not None and (token_weight.shape != (n_tokens,) or token_weight.dtype != torch.float32):
        raise ValueError(
            f"linear_cross_entropy_triton: token_weight must be ({n_tokens},) float32, got "
            f"{tuple(token_weight.shape)} {token_weight.dtype}"
        )
    for name, tensor in (("weight", weight), ("labels", labels), ("token_weight", token_weight)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"linear_cross_entropy_triton: {name} is on {tensor.device}, hidden on {hidden.device}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"linear_cross_entropy_triton: chunk_tokens={chunk_tokens} must be >= 1 (or None)")


def check_labels(labels: torch.Tensor, n_vocab: int, ignore_index: int = IGNORE_INDEX) -> None:
    """Labels must be in [0, V) or ignore_index, else ValueError (reads two numbers on the host: one sync)."""
    if labels.numel() == 0:
        return
    valid = labels[labels != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= n_vocab):
        raise ValueError(
            f"linear_cross_entropy_triton: labels hold values in [{int(valid.min())}, {int(valid.max())}], "
            f"outside the vocabulary [0, {n_vocab}) (and not ignore_index={ignore_index})"
        )


def linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
    labels_checked: bool = False,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, summed, never holding more than a chunk of logits.

    Arguments:
        hidden: (N, D); weight: (V, D), the LM head (no bias). float16, bfloat16 or float32; under
            autocast both are cast once to autocast's dtype, as F.linear would be.
        labels: (N,) int64 in [0, V), or ``ignore_index`` (no loss, no gradient).
        token_weight: None or (N,) float32; token i's loss is multiplied by it (lm_loss's per-sample
            weighting). No gradient flows to it.
        chunk_tokens: tokens per chunk; None picks ~1 GiB of logits per chunk.
        labels_checked: the caller ran :func:`check_labels` on these labels already. lm_loss does, before
            its forward: the check here, after the forward is queued, would hold the host until it had run.
    Returns:
        A float32 scalar, differentiable in hidden and weight (gradients in their dtypes).

    The logits of a chunk are one GEMM in the compute dtype, the softmax and loss are float32, and
    ``d weight`` accumulates in float32. The gradients are computed in the forward (only for the inputs
    that require them) and kept until the backward: N x D plus a float32 V x D. Checks that every label
    is in range (one host sync) unless ``labels_checked``. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests only).
    Every limit raises ValueError. Tested in tests/vlm_core/kernels/test_linear_cross_entropy.py
    against a float64 reference (interpreter on the CPU; the GPU cases there, V=151,936, were not run
    when this was written).
    """
    _check_limits(hidden, weight, labels, token_weight, chunk_tokens)
    if not labels_checked:
        check_labels(labels, weight.shape[0], ignore_index)
    return _LinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight.contiguous(), labels.contiguous(),
        token_weight.contiguous() if token_weight is not None else None, int(ignore_index), chunk_tokens,
    )  # fmt: skip


LINEAR_CROSS_ENTROPY_IMPLS = {"reference": linear_cross_entropy_reference, "triton": linear_cross_entropy_triton}


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "reference",
) -> torch.Tensor:
    """Summed (weighted) cross-entropy of ``hidden @ weight.T`` through ``impl`` ("reference" or "triton")."""
    if impl not in LINEAR_CROSS_ENTROPY_IMPLS:
        raise ValueError(
            f"linear_cross_entropy: unknown impl={impl!r}; expected one of {sorted(LINEAR_CROSS_ENTROPY_IMPLS)}"
        )
    return LINEAR_CROSS_ENTROPY_IMPLS[impl](hidden, weight, labels, token_weight, ignore_index)


class FusedLinearCrossEntropy(nn.Module):
    """The fused loss as a module (no parameters): forward(hidden, weight, labels, token_weight=None)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, chunk_tokens: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.chunk_tokens = chunk_tokens

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, token_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear_cross_entropy_triton(hidden, weight, labels, token_weight, self.ignore_index, self.chunk_tokens)


__all__ = [
    "LINEAR_CROSS_ENTROPY_IMPLS",
    "FusedLinearCrossEntropy",
    "default_chunk_tokens",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_cross_entropy_triton",
]
