"""Kernels: each op has a plain-PyTorch reference (the specification) and faster implementations.

``packed_attention`` is the one entry point the model calls. It validates its inputs once and
dispatches through ``ATTENTION_IMPLS``:

    reference   plain PyTorch, the specification (attention_reference.py); any device
    sdpa        F.scaled_dot_product_attention with a dense mask (attention_torch.py); any device
    flex        FlexAttention with the contract as a mask_mod; CUDA, or CPU forward only
    triton      our fused kernel (packed_attention_triton.py); CUDA, or CPU under TRITON_INTERPRET=1
    varlen      torch's varlen_attn (FlashAttention-2 inside PyTorch); CUDA, causal-only masks
    flash_attn  the flash-attn package's flash_attn_varlen_func; CUDA, causal-only masks

``resolve_attn_impl`` turns a configured name (or "auto") into one that can run on a device, logging
the choice and, for a fallback, why. ``resolve_kernel_impls`` does the same for ``model.kernel_impl``,
the one switch of the fused training kernels (rmsnorm.py, swiglu.py, rope.py, fused_projector.py,
linear_cross_entropy.py: each a reference and a Triton implementation); ext.py wraps the optional
compiled extension built from csrc/. The names also sit in ``vlm_core.model.config.ATTN_IMPLS``
(plus "auto"); a test keeps the two in step.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
from collections.abc import Callable
from types import ModuleType

import torch

from vlm_core.kernels.attention_reference import (
    packed_attention_mask,
    packed_attention_reference,
)
from vlm_core.kernels.attention_torch import (
    packed_attention_flash_attn,
    packed_attention_flex,
    packed_attention_sdpa,
    packed_attention_varlen,
)
from vlm_core.kernels.packing_memo import LastPacking

log = logging.getLogger(__name__)

AttentionFn = Callable[..., torch.Tensor]


def _triton_module() -> tuple[ModuleType | None, str]:
    """The Triton kernel's module, imported on first use, or None and the import error.

    Imported lazily, so that ``import vlm_core.kernels`` does not import triton: tests set
    TRITON_INTERPRET=1 after importing this package, and with triton 3.7.1 the interpreter fails
    ("Cannot call @triton.jit'd outside of the scope of a kernel") if triton itself was imported
    before the variable was set.
    """
    try:
        module = importlib.import_module("vlm_core.kernels.packed_attention_triton")
    except ImportError as error:
        return None, f"vlm_core.kernels.packed_attention_triton cannot be imported ({error})"
    return module, ""


def _packed_attention_triton_lazy(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    bidir_group: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """The fused Triton kernel (vlm_core/kernels/packed_attention_triton.py), imported on first call.

    (Not named ``packed_attention_triton``: that name is the submodule's, and the import system sets
    it as an attribute of this package when the submodule loads.)
    """
    module, reason = _triton_module()
    if module is None:
        raise RuntimeError(f"packed_attention impl=triton: {reason}; use impl=auto to fall back, or impl=reference")
    return module.packed_attention_triton(
        q, k, v, cu_seqlens, max_seqlen, bidir_group=bidir_group, softmax_scale=softmax_scale
    )


# name -> function with the signature of packed_attention_reference.
ATTENTION_IMPLS: dict[str, AttentionFn] = {
    "reference": packed_attention_reference,
    "sdpa": packed_attention_sdpa,
    "flex": packed_attention_flex,
    "triton": _packed_attention_triton_lazy,
    "varlen": packed_attention_varlen,
    "flash_attn": packed_attention_flash_attn,
}
CAUSAL_ONLY_IMPLS: tuple[str, ...] = ("varlen", "flash_attn")  # cannot express bidirectional image spans

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_cu_seqlens_values(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> bool:
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"packed_attention: cu_seqlens must start at 0 and end at total={total}, "
            f"got cu_seqlens[0]={bounds[0]}, cu_seqlens[-1]={bounds[-1]}"
        )
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    if min(lengths) < 0:
        at = lengths.index(min(lengths))
        raise ValueError(f"packed_attention: cu_seqlens decreases at index {at} ({bounds[at]} -> {bounds[at + 1]})")
    if max_seqlen < max(lengths):
        raise ValueError(f"packed_attention: max_seqlen={max_seqlen!r} must be an int >= the longest segment ({max(lengths)})")
    return True


_checked_cu_seqlens: LastPacking[bool] = LastPacking()


def _check_packing(
    cu_seqlens: torch.Tensor, max_seqlen: int, bidir_group: torch.Tensor | None, total: int
) -> None:
    """The checks of :func:`packed_attention` that depend on the packing alone (not on q, k, v).

    The value checks on ``cu_seqlens`` read it on the host: one device sync for the first call on a
    cu_seqlens tensor, none for the calls that follow on the same unchanged tensor (a model's other layers).
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"packed_attention: cu_seqlens must be 1-d int32 (n + 1,), got shape {tuple(cu_seqlens.shape)} "
            f"dtype {cu_seqlens.dtype}; build it with torch.tensor(..., dtype=torch.int32)"
        )
    if cu_seqlens.numel() < 2:
        raise ValueError(f"packed_attention: cu_seqlens needs at least 2 entries (one segment), got {cu_seqlens.numel()}")
    if not isinstance(max_seqlen, int):
        raise ValueError(f"packed_attention: max_seqlen={max_seqlen!r} must be an int >= the longest segment")
    # the one host read: once per batch, not per layer (see packing_memo.py)
    _checked_cu_seqlens.get(cu_seqlens, None, (total, max_seqlen),
                            lambda: _check_cu_seqlens_values(cu_seqlens, total, max_seqlen))  # fmt: skip
    if bidir_group is not None and (
        bidir_group.dim() != 1 or bidir_group.dtype != torch.int32 or bidir_group.numel() != total
    ):
        raise ValueError(
            f"packed_attention: bidir_group must be 1-d int32 of length total={total}, "
            f"got shape {tuple(bidir_group.shape)} dtype {bidir_group.dtype}"
        )


def _check_packed_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    bidir_group: torch.Tensor | None,
    softmax_scale: float | None,
) -> None:
    """Raise ValueError on anything that breaks the contract of :func:`packed_attention` (the packing's part in
    :func:`_check_packing`)."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"packed_attention: {name} must be a 3-d tensor (total, heads, head_dim), got {shape}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"packed_attention: {name}.dtype={tensor.dtype}; expected one of {list(_FLOAT_DTYPES)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"packed_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(
            f"packed_attention: q, k, v, cu_seqlens are on different devices "
            f"({q.device}, {k.device}, {v.device}, {cu_seqlens.device})"
        )
    if k.shape != v.shape:
        raise ValueError(f"packed_attention: k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    total, num_q_heads, head_dim = q.shape
    if total < 1:
        raise ValueError("packed_attention: q has no tokens (total == 0)")
    if k.shape[0] != total:
        raise ValueError(f"packed_attention: k/v have {k.shape[0]} tokens but q has {total}")
    if k.shape[2] != head_dim:
        raise ValueError(f"packed_attention: k/v head_dim {k.shape[2]} differs from q head_dim {head_dim}")
    num_kv_heads = k.shape[1]
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"packed_attention: Hq={num_q_heads} query heads is not a multiple of Hkv={num_kv_heads} KV heads "
            "(grouped-query attention shares each KV head among Hq/Hkv query heads)"
        )
    _check_packing(cu_seqlens, max_seqlen, bidir_group, total)
    if bidir_group is not None and bidir_group.device != q.device:
        raise ValueError(f"packed_attention: bidir_group is on {bidir_group.device}, q on {q.device}")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"packed_attention: softmax_scale={softmax_scale!r} must be positive (or None for 1/sqrt(Dh))")


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    bidir_group: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    impl: str = "reference",
) -> torch.Tensor:
    """Attention over a packed batch: causal text, bidirectional image spans, no cross-sample attention.

    Arguments:
        (shapes as in flash-attn's ``flash_attn_varlen_func``)
        q: (total, Hq, Dh); k, v: (total, Hkv, Dh) with Hq % Hkv == 0, one float dtype, one device.
            Query head h reads KV head h // (Hq // Hkv) (grouped-query attention).
        cu_seqlens: (n + 1,) int32, cu_seqlens[0] == 0, cu_seqlens[-1] == total, non-decreasing.
        max_seqlen: int >= the longest segment.
        bidir_group: (total,) int32 or None (= all text). 0 marks text; equal non-zero ids in one
            segment attend to each other in both directions.
        softmax_scale: defaults to 1 / sqrt(Dh).
        impl: a key of ``ATTENTION_IMPLS`` ("auto" is not one: turn it into one with
            :func:`resolve_attn_impl`). An impl that cannot serve the call raises ValueError or
            RuntimeError with the reason (e.g. varlen with image spans, flex backward on the CPU).
    Returns:
        (total, Hq, Dh) in q's dtype; differentiable.

    This docstring is the contract every entry of ``ATTENTION_IMPLS`` shares (same signature, less
    ``impl``); each implementation documents only its own limits. Token i attends to j iff they share a segment and (j <= i or bidir_group[i] == bidir_group[j] != 0).
    Every limit above raises ValueError here, before any implementation runs.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"packed_attention: unknown impl={impl!r}; available: {sorted(ATTENTION_IMPLS)}")
    _check_packed_attention_inputs(q, k, v, cu_seqlens, max_seqlen, bidir_group, softmax_scale)
    return ATTENTION_IMPLS[impl](q, k, v, cu_seqlens, max_seqlen, bidir_group=bidir_group, softmax_scale=softmax_scale)


def prepare_packed_attention(
    cu_seqlens: torch.Tensor, max_seqlen: int, bidir_group: torch.Tensor | None, total: int, impl: str
) -> None:
    """Take now the host reads that the first :func:`packed_attention` call on this packing would take.

    That is the value checks of ``cu_seqlens`` and, for ``impl="triton"``, the kernel's attention windows, one
    device sync each. A model calls this before it queues the forward's GPU work; its layers then find both
    in the per-batch memos (packing_memo.py) and never sync. A sync in the first layer instead would hold the
    host until the vision tower and the projector had run, with nothing queued behind them. Raises the
    ValueError that call would raise on a malformed packing (cu_seqlens, max_seqlen, bidir_group).
    """
    _check_packing(cu_seqlens, max_seqlen, bidir_group, total)
    if impl == "triton":
        module, _ = _triton_module()
        if module is not None:  # else the layers' calls raise the reason
            module.batch_windows(cu_seqlens, bidir_group, total)


def attn_impl_status(
    name: str, device: str | torch.device, needs_bidir: bool = True, needs_backward: bool = True
) -> tuple[bool, str]:
    """Can ``ATTENTION_IMPLS[name]`` serve a model on ``device``? Returns (ok, the reason if not).

    needs_bidir: batches carry image spans (bidir_group != 0), which causal-only kernels cannot mask.
    needs_backward: gradients are needed (training), which FlexAttention does not provide on the CPU.
    """
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attn_impl_status: unknown impl {name!r}; available: {sorted(ATTENTION_IMPLS)}")
    device = torch.device(device)
    if name in ("reference", "sdpa"):
        return True, ""
    if name in CAUSAL_ONLY_IMPLS and needs_bidir:
        return False, f"{name} computes causal-only masks and cannot attend within bidirectional image spans"
    if name == "flex":
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError as error:
            return False, f"torch {torch.__version__} has no FlexAttention ({error})"
        if device.type == "cpu" and needs_backward:
            return False, f"FlexAttention in torch {torch.__version__} has no backward pass on the CPU"
        if device.type not in ("cpu", "cuda"):
            return False, f"FlexAttention is wired here for cuda and cpu, not {device.type}"
        return True, ""
    if name == "triton":
        module, reason = _triton_module()
        if module is None:
            return False, reason
        ok, reason = module.triton_status(device)  # CUDA, or the CPU under TRITON_INTERPRET=1
        return ok, "" if ok else reason
    if device.type != "cuda":
        return False, f"{name} (FlashAttention-2) runs on CUDA only, not {device.type}"
    if name == "varlen":
        try:
            importlib.import_module("torch.nn.attention.varlen")
        except ImportError as error:
            return False, f"torch {torch.__version__} has no torch.nn.attention.varlen ({error})"
        return True, ""
    try:  # name == "flash_attn"
        importlib.import_module("flash_attn")
    except ImportError as error:
        return False, f"the flash-attn package is not importable ({error})"
    return True, ""


def _resolve_impl(
    label: str,
    field: str,
    requested: str,
    names: tuple[str, ...] | list[str],
    device: torch.device,
    status: Callable[[str], tuple[bool, str]],
    cuda_fallback: str,
    logger: logging.Logger,
) -> str:
    """The shared rule of :func:`resolve_attn_impl` and :func:`resolve_kernel_impl`.

    "auto" is triton on CUDA when ``status("triton")`` allows it (compiled: not under
    TRITON_INTERPRET=1), else ``cuda_fallback`` on CUDA, and "reference" off CUDA. An explicit name that
    ``status`` rejects falls back the same way with a WARNING naming what was requested, the choice
    and the reason. The choice is logged at INFO as "<label>: <field>=...".
    """
    fallback = cuda_fallback if device.type == "cuda" else "reference"
    if requested == "auto":
        if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
            chosen, why = fallback, "not triton: TRITON_INTERPRET=1 would run it in Triton's interpreter"
        elif device.type == "cuda":
            ok, reason = status("triton")
            chosen, why = ("triton", "the Triton kernel can run") if ok else (fallback, f"not triton: {reason}")
        else:
            chosen, why = "reference", f"no fused kernel is used on {device.type}"
        logger.info("%s: %s=auto -> %s on %s (%s)", label, field, chosen, device, why)
        return chosen
    if requested not in names:
        raise ValueError(f"resolve_{field}: unknown {field}={requested!r}; expected 'auto' or one of {sorted(names)}")
    ok, reason = status(requested)
    chosen = requested if ok else fallback
    if not ok:
        logger.warning("%s: %s=%s cannot run on %s: %s; falling back to %s=%s", label, field, requested, device, reason,
                       field, chosen)  # fmt: skip
    logger.info("%s: %s=%s on %s (requested %s)", label, field, chosen, device, requested)
    return chosen


def resolve_attn_impl(
    requested: str, device: str | torch.device, needs_bidir: bool = True, needs_backward: bool = True
) -> str:
    """The key of ``ATTENTION_IMPLS`` to use for ``requested`` (a key, or "auto") on ``device``.

    - "auto": triton on CUDA when it can run there (compiled: not under TRITON_INTERPRET=1), else sdpa
      on CUDA; reference off CUDA (the Triton interpreter is far too slow to train with).
    - An explicit name that cannot run here (see :func:`attn_impl_status`) falls back to sdpa on CUDA,
      reference elsewhere, with a WARNING that names the requested impl, the chosen one and the reason.
    The choice is logged at INFO. Call it once per model and device (the decoder does), not per step.
    """
    device = torch.device(device)
    return _resolve_impl(
        "attention", "attn_impl", requested, list(ATTENTION_IMPLS), device,
        lambda name: attn_impl_status(name, device, needs_bidir, needs_backward), "sdpa", log,
    )  # fmt: skip


# The fused training kernels behind ``model.kernel_impl`` (one switch for all of them): RMSNorm,
# SwiGLU, RoPE, the projector merge and the linear + cross-entropy loss. Each has a reference and a
# Triton implementation in its own module (rmsnorm.py, swiglu.py, rope.py, fused_projector.py,
# linear_cross_entropy.py); the names also sit in vlm_core.model.config.KERNEL_IMPLS (plus "auto").
KERNEL_IMPLS: tuple[str, ...] = ("reference", "triton")
FUSED_OPS: tuple[str, ...] = ("rmsnorm", "swiglu", "rope", "projector", "linear_cross_entropy")
# A child logger, so that the attention choice stays the one "vlm_core.kernels" record per model.
kernel_log = logging.getLogger(__name__ + ".fused")


def kernel_impl_status(name: str, device: str | torch.device) -> tuple[bool, str]:
    """Can the fused kernels ``name`` ("reference" or "triton") run on ``device``? (ok, reason if not)."""
    if name not in KERNEL_IMPLS:
        raise ValueError(f"kernel_impl_status: unknown kernel_impl {name!r}; available: {list(KERNEL_IMPLS)}")
    if name == "reference":
        return True, ""
    from vlm_core.kernels.triton_runtime import (
        triton_status,  # imports triton only when called
    )

    ok, reason = triton_status(device, what="the fused Triton kernels")
    return ok, "" if ok else reason


def resolve_kernel_impls(
    requested: str, device: str | torch.device, op_problems: dict[str, str] | None = None
) -> dict[str, str]:
    """{op: "reference" or "triton"} for every op of ``FUSED_OPS``, from ``model.kernel_impl``.

    ``requested`` resolves as attention does (see :func:`_resolve_impl`; the fallback is reference on
    every device). ``op_problems`` maps an op to why this model cannot use its Triton kernel (a shape
    limit, a projector that is not two plain Linear layers); such an op falls back to reference with
    a WARNING. Logged to "vlm_core.kernels.fused"; call it once per model and device.
    """
    device = torch.device(device)
    chosen = _resolve_impl(
        "fused kernels", "kernel_impl", requested, list(KERNEL_IMPLS), device,
        lambda name: kernel_impl_status(name, device), "reference", kernel_log,
    )  # fmt: skip
    impls = dict.fromkeys(FUSED_OPS, chosen)
    for op, problem in (op_problems or {}).items():
        if op not in impls:
            raise ValueError(f"resolve_kernel_impls: unknown op {op!r}; expected one of {list(FUSED_OPS)}")
        if chosen == "triton" and problem:
            kernel_log.warning("fused kernels: %s cannot use kernel_impl=triton: %s; falling back to reference", op,
                               problem)  # fmt: skip
            impls[op] = "reference"
    return impls


__all__ = [
    "ATTENTION_IMPLS",
    "CAUSAL_ONLY_IMPLS",
    "FUSED_OPS",
    "KERNEL_IMPLS",
    "attn_impl_status",
    "kernel_impl_status",
    "packed_attention",
    "packed_attention_flash_attn",
    "packed_attention_flex",
    "packed_attention_mask",
    "packed_attention_reference",
    "packed_attention_sdpa",
    "packed_attention_varlen",
    "prepare_packed_attention",
    "resolve_attn_impl",
    "resolve_kernel_impls",
]
