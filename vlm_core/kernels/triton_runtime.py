"""What the Triton kernel modules here share: can Triton run, compile-on-first-use, interpreter workarounds.

- :func:`triton_status` says whether Triton kernels can run on a device (CUDA compiled, or CPU tensors
  under ``TRITON_INTERPRET=1``) and, if not, why.
- :func:`make_jit` gives a private globals dict and a ``jit`` that decorates a plain function into it.
  Triton fixes interpreter-or-GPU when a function is decorated (and, for triton's own library, when
  triton is first imported), so every kernel module keeps its kernels as plain functions and
  decorates them on first use; that way importing a kernel module neither imports triton nor fixes
  the mode before a test sets ``TRITON_INTERPRET=1``.
- :func:`_dot` and :func:`_cast` are device helpers (plain functions, decorated with the kernels that
  call them) that work around the interpreter's bfloat16 arithmetic.
- :func:`compute_dtype` is the dtype a fused op computes in: autocast's, when autocast is on.
- :func:`autotune_candidates` narrows an autotuned launch to its first config (VLM_TRITON_AUTOTUNE=first);
  :func:`size_bucket` rounds a size that varies per batch to the power of two an autotune key reads.

Nothing here imports triton at module import time.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import triton.language as tl  # noqa: TC004  (kernels get the real module as a global from make_jit)


def interpreting() -> bool:
    """Is TRITON_INTERPRET=1 in effect now (kernels launched now run in Triton's interpreter)?"""
    import triton

    return bool(triton.knobs.runtime.interpret)


def library_interpreted() -> bool:
    """Was triton.language decorated for the interpreter (TRITON_INTERPRET=1 at its import)?"""
    import triton.language
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.max, InterpretedFunction)


def triton_status(device: torch.device | str | None = None, what: str = "the Triton kernel") -> tuple[bool, str]:
    """Can Triton kernels run on ``device``? Returns (ok, reason); the reason says why not, or how.

    device: where the tensors live; None means CUDA when available, else the CPU. CUDA tensors
    run compiled kernels (or the interpreter when TRITON_INTERPRET=1); CPU tensors run only in
    Triton's interpreter, which needs TRITON_INTERPRET=1 (already when triton is first
    imported) and is meant for tests, not training.
    """
    try:
        import triton
    except ImportError as error:
        return False, f"triton is not importable ({error}); pip install triton (Linux)"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    interpret = bool(triton.knobs.runtime.interpret)
    version = f"triton {triton.__version__}"
    if device.type not in ("cpu", "cuda"):
        return False, f"{what} runs on cuda or cpu tensors, not {device.type}"
    if device.type == "cpu" and not interpret:
        return False, (
            f"{version} runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported (tests and debugging only; far too slow to train)"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        return False, f"{version}: CUDA is not available in torch {torch.__version__}"
    if interpret != library_interpreted():
        now, then = ("set", "unset") if interpret else ("unset", "set")
        return False, (
            f"{version}: TRITON_INTERPRET is {now} now but was {then} when triton was first "
            "imported, and triton fixes interpreter-or-GPU for its own library (tl.max, "
            "tl.sum, ...) at import; set TRITON_INTERPRET=1 (or not) before anything imports "
            "triton, e.g. in the environment"
        )
    if interpret:
        where = "the CPU" if device.type == "cpu" else "CUDA tensors"
        return True, f"{version} interpreter on {where} (TRITON_INTERPRET=1; slow)"
    return True, f"{version} compiled for {torch.cuda.get_device_name(device)}"


def check_can_run(op: str, device: torch.device) -> None:
    """Raise ValueError naming ``op`` if Triton kernels cannot run on ``device``."""
    ok, reason = triton_status(device)
    if not ok:
        raise ValueError(f"{op}: cannot run on {device}: {reason}")


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what every fused Triton op here takes


def check_dtype(op: str, name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError naming ``op`` and the argument ``name`` unless ``tensor`` is float16, bfloat16 or float32."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{op}: {name}.dtype={tensor.dtype} is not supported; expected one of {list(SUPPORTED_DTYPES)} "
            "(use impl='reference' for float64)"
        )


def make_jit(module_name: str) -> tuple[dict, Callable]:
    """A private globals dict holding ``tl`` and ``triton``, and ``jit(fn)`` that decorates a copy of fn into it.

    A kernel finds the helpers it calls through its globals, so each compiled mode (interpreter or
    GPU) gets its own copies of every function with this dict as their globals.
    """
    import triton
    import triton.language as triton_language

    namespace: dict = {"tl": triton_language, "triton": triton, "__name__": module_name}

    def jit(fn):
        copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__)
        copy.__annotations__ = dict(fn.__annotations__)
        copy.__module__ = fn.__module__
        copy.__qualname__ = fn.__qualname__
        copy.__doc__ = fn.__doc__
        namespace[fn.__name__] = triton.jit(copy)
        return namespace[fn.__name__]

    for helper in DEVICE_HELPERS:
        jit(helper)
    return namespace, jit


AUTOTUNE_ENV = "VLM_TRITON_AUTOTUNE"


def autotune_candidates(configs: list) -> list:
    """The autotune configs to time, of those an op kept for a launch: all, or the first alone when the
    environment has VLM_TRITON_AUTOTUNE=first.

    ``first`` is for correctness runs on a GPU (scripts/gpu_session.sh check): each kernel compiles one config
    per shape class instead of ten and nothing is timed, so hundreds of test shapes fit in minutes. Training
    and benchmarks leave it unset. Read at each new autotune key, so it can be set after import.
    """
    mode = os.environ.get(AUTOTUNE_ENV, "all")
    if mode not in ("all", "first"):
        raise ValueError(f"{AUTOTUNE_ENV}={mode!r}; expected 'all' (the default) or 'first'")
    return configs[:1] if mode == "first" else configs


def size_bucket(size: int, floor: int = 1) -> int:
    """``size`` rounded up to a power of two (at least ``floor``): an autotune key for a size that changes
    from batch to batch (rows of a packed batch, image tokens), so that a new batch re-tunes only when its
    size crosses a power of two instead of at every new value (each tuning times every config)."""
    return max(floor, 1 << (max(size, 1) - 1).bit_length())


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a fused op's matrix products run in: autocast's for the tensor's device when it is on."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type) and tensor.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


MAX_ROW_DIM = 65536  # a row kernel holds one row in registers: 64k float32 values per program is Liger's limit too


def row_launch_settings(dim: int) -> tuple[int, int, int]:
    """(BLOCK_M rows per program, BLOCK_D, num_warps) of a kernel that holds whole rows of ``dim`` values.
    Warps grow with the row as in Liger's calculate_settings (4 below 2048, 8, 16 from 8192, 32 from
    32768); narrow rows share a program so that each program holds ~4k elements (D=128: 32 rows).
    Not yet tuned on a GPU."""
    block_d = max(16, 1 << (dim - 1).bit_length())
    num_warps = 32 if block_d >= 32768 else 16 if block_d >= 8192 else 8 if block_d >= 2048 else 4
    block_m = max(1, min(64, 4096 // block_d))
    return block_m, block_d, num_warps


def reduction_programs(blocks: int, device: torch.device) -> int:
    """Programs of a grid-stride row kernel that also sums over rows (one float32 partial row each): enough
    to fill the GPU, few enough that the partial sums stay small."""
    if device.type == "cuda":
        return max(1, min(blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(blocks, 4))


def interpret_bf16(dtype: torch.dtype) -> bool:
    """Do the kernels need the interpreter's bfloat16 workarounds (see _dot and _cast) for ``dtype``?"""
    return dtype == torch.bfloat16 and interpreting()


# --------------------------------------------------------------------------------------------
# Device helpers (plain functions; make_jit decorates them into every kernel namespace)
# --------------------------------------------------------------------------------------------


def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """a @ b (+ acc) with float32 accumulation. The operands must share a dtype, as tl.dot requires on the
    GPU; checked here too because the interpreter's upcast below would hide a mismatch on the CPU."""
    tl.static_assert(a.dtype == b.dtype, "_dot: the operands' dtypes differ")
    if INTERPRET_BF16:
        # Triton's interpreter (<= 3.8) multiplies the raw bits of bfloat16 operands as integers.
        # Products of two bfloat16 values are exact in float32, so upcasting first gives what
        # the GPU's tensor cores compute (bf16 products, fp32 accumulation).
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def _cast(x, dtype, INTERPRET_BF16: tl.constexpr):
    """x.to(dtype), rounding to nearest even as the GPU does."""
    if INTERPRET_BF16:  # noqa: SIM102  (a constexpr test first: the GPU build never sees the inner one)
        if dtype == tl.bfloat16 and x.dtype == tl.float32:
            # The interpreter truncates float32 -> bfloat16 (and its "rtne" mode misrounds), which
            # doubles the rounding error; round the float32 bits to nearest even first.
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


DEVICE_HELPERS = (_dot, _cast)

__all__ = [
    "MAX_ROW_DIM",
    "check_can_run",
    "check_dtype",
    "compute_dtype",
    "interpret_bf16",
    "interpreting",
    "library_interpreted",
    "make_jit",
    "reduction_programs",
    "row_launch_settings",
    "size_bucket",
    "triton_status",
]
