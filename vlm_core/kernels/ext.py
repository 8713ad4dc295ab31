"""The optional compiled extension (csrc/, built by setup.py): packed-batch metadata and row scatter/gather.

Each op has a plain-PyTorch reference here (the specification) and runs through the extension when it
is loaded and has a kernel for the tensors' device, else through the reference; the first fallback
per op and device is logged with the reason. The extension is looked for as ``vlm_core/_ext*.so``
(``python setup.py build_ext --inplace``, which ``make setup`` runs); a library already loaded into
the process (``torch.utils.cpp_extension.load``, as the tests' fixture does) is used as it is.

    packed_metadata(input_ids, seqlens, image_token_id, tokens_per_image) -> (cu_seqlens, position_ids, bidir_group)
    scatter_rows(dst, rows, src) -> dst with dst[rows[m]] = src[m]   (differentiable; in place with the extension)
    gather_rows(src, rows) -> src[rows]                               (differentiable)
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EXT_IMPLS = ("auto", "reference", "extension")
CSRC = Path(__file__).resolve().parents[2] / "csrc"  # sources, for builds from a checkout


# --------------------------------------------------------------------------------------------
# References (the specification)
# --------------------------------------------------------------------------------------------


def packed_metadata_reference(
    input_ids: torch.Tensor, seqlens: torch.Tensor, image_token_id: int, tokens_per_image: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed-batch metadata of ``vlm_core.data.packing.pack`` rebuilt from the token stream.

    Arguments:
        input_ids: (total,) int64, the packed stream (samples and padding segments back to back).
        seqlens: (n,) int32/int64, the segment lengths (>= 0, summing to total).
        image_token_id: the id every image token carries; tokens_per_image: P >= 1.
    Returns:
        cu_seqlens (n + 1,) int32; position_ids (total,) int64, restarting at 0 in every segment;
        bidir_group (total,) int32: 0 for text, and images numbered 1..N_img in stream order, every P
        consecutive image tokens of a segment being one image.
    Raises ValueError when a run of image tokens inside a segment is not a whole number of images.
    """
    if input_ids.dim() != 1 or input_ids.dtype != torch.int64:
        raise ValueError(f"packed_metadata: input_ids must be 1-d int64 (total,), got {tuple(input_ids.shape)} {input_ids.dtype}")
    if seqlens.dim() != 1 or seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"packed_metadata: seqlens must be 1-d int32 or int64 (n,), got {tuple(seqlens.shape)} {seqlens.dtype}")
    if tokens_per_image < 1:
        raise ValueError(f"packed_metadata: tokens_per_image={tokens_per_image} must be >= 1")
    total = input_ids.numel()
    lengths = seqlens.long()
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"packed_metadata: seqlens has a negative length ({int(lengths.min())})")
    if int(lengths.sum()) != total:
        raise ValueError(f"packed_metadata: seqlens sum to {int(lengths.sum())} but input_ids has {total} tokens")
    bounds = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=input_ids.device)
    bounds[1:] = torch.cumsum(lengths, 0)
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=input_ids.device), lengths)  # [total]
    positions = torch.arange(total, device=input_ids.device)
    starts, stops = bounds[segment], bounds[segment + 1]
    is_image = input_ids == image_token_id
    before = torch.cumsum(is_image.long(), 0) - 1  # image tokens before t (at image tokens)
    previous_image = torch.cat([is_image.new_zeros(1), is_image[:-1]])
    next_image = torch.cat([is_image[1:], is_image.new_zeros(1)])
    run_start = is_image & ((positions == starts) | ~previous_image)
    run_end = is_image & ((positions + 1 == stops) | ~next_image)
    bad = (run_start & (before % tokens_per_image != 0)) | (run_end & ((before + 1) % tokens_per_image != 0))
    if bool(bad.any()):
        at = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"packed_metadata: the run of image tokens (id {image_token_id}) around token {at} of segment "
            f"{int(segment[at])} is not a whole number of images of tokens_per_image={tokens_per_image} tokens; "
            "each <image> must expand to exactly that many tokens inside one sample"
        )
    bidir_group = torch.where(is_image, torch.div(before, tokens_per_image, rounding_mode="floor") + 1, 0)
    return bounds.int(), positions - starts, bidir_group.int()


def scatter_rows_reference(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A new tensor: dst with row rows[m] replaced by src[m]. dst (total, D); rows (M,) int64; src (M, D)."""
    return dst.index_copy(0, rows, src)


def gather_rows_reference(src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """src[rows]: (M, D) from src (total, D) and rows (M,) int64."""
    return src.index_select(0, rows)


# --------------------------------------------------------------------------------------------
# Loading the extension
# --------------------------------------------------------------------------------------------


def _registered() -> bool:
    """Are the extension's ops registered in this process (by any load)?"""
    return hasattr(torch.ops.vlm_ext, "gather_rows")  # the op namespace raises AttributeError for unknown ops


@functools.cache
def load_extension() -> tuple[bool, str]:
    """Load the compiled extension once; (loaded, how or why not). Does not build anything."""
    if _registered():
        return True, "already loaded in this process"
    spec = importlib.util.find_spec("vlm_core._ext")
    if spec is None or spec.origin is None:
        return False, (
            "vlm_core._ext is not built (run `make setup`, or `python setup.py build_ext --inplace`; it needs a "
            "C++ compiler)"
        )
    try:
        torch.ops.load_library(spec.origin)
    except OSError as error:  # a library built against another torch, or missing symbols
        return False, f"{spec.origin} does not load ({error}); rebuild it with `python setup.py build_ext --inplace`"
    if not _registered():
        return False, f"{spec.origin} loaded but registered no vlm_ext ops"
    return True, f"loaded {spec.origin}"


def extension_status(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Can the extension's ops run on ``device``? (ok, reason)."""
    loaded, reason = load_extension()
    if not loaded:
        return False, reason
    device = torch.device(device)
    if device.type == "cpu":
        return True, reason
    if device.type == "cuda":
        if torch._C._dispatch_has_kernel_for_dispatch_key("vlm_ext::gather_rows", "CUDA"):
            return True, reason
        return False, "the extension was built without its CUDA part (setup.py builds it only with CUDA torch and nvcc)"
    return False, f"the extension has kernels for cpu and cuda, not {device.type}"


@functools.cache
def _log_fallback(op: str, device_type: str, reason: str) -> None:
    """Log each (op, device, reason) fallback once."""
    log.info("%s: the compiled extension cannot run on %s (%s); using the Python reference", op, device_type, reason)


def _use_extension(op: str, impl: str, device: torch.device) -> bool:
    if impl not in EXT_IMPLS:
        raise ValueError(f"{op}: unknown impl={impl!r}; expected one of {list(EXT_IMPLS)}")
    if impl == "reference":
        return False
    ok, reason = extension_status(device)
    if ok:
        return True
    if impl == "extension":
        raise RuntimeError(f"{op}: impl='extension' but {reason}")
    _log_fallback(op, device.type, reason)
    return False


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def packed_metadata(
    input_ids: torch.Tensor, seqlens: torch.Tensor, image_token_id: int, tokens_per_image: int, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cu_seqlens, position_ids, bidir_group) of a packed token stream; see :func:`packed_metadata_reference`.

    impl: "auto" (the extension when it can run on input_ids' device, else the reference, logged once),
    "extension" (RuntimeError if it cannot run) or "reference". The CUDA kernel syncs once (to raise
    on a malformed image run); the CPU kernel scans the stream once.
    """
    if _use_extension("packed_metadata", impl, input_ids.device):
        return torch.ops.vlm_ext.packed_metadata(input_ids, seqlens, int(image_token_id), int(tokens_per_image))
    return packed_metadata_reference(input_ids, seqlens, image_token_id, tokens_per_image)


def _check_rows(op: str, table: torch.Tensor, rows: torch.Tensor) -> None:
    if table.dim() != 2:
        raise ValueError(f"{op}: the row table must be 2-d (total, D), got {tuple(table.shape)}")
    if rows.dim() != 1 or rows.dtype != torch.int64 or rows.device != table.device:
        raise ValueError(
            f"{op}: rows must be 1-d int64 on {table.device}, got {tuple(rows.shape)} {rows.dtype} on {rows.device}"
        )


class _ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dst, rows, src):
        torch.ops.vlm_ext.scatter_rows_(dst, rows, src)
        ctx.mark_dirty(dst)
        ctx.save_for_backward(rows)
        return dst

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_src = torch.ops.vlm_ext.gather_rows(grad, rows) if ctx.needs_input_grad[2] else None
        grad_dst = grad.index_fill(0, rows, 0) if ctx.needs_input_grad[0] else None  # overwritten rows
        return grad_dst, None, grad_src


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, rows):
        ctx.save_for_backward(rows)
        ctx.total = src.shape[0]
        return torch.ops.vlm_ext.gather_rows(src, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        # Rows may repeat in a gather: accumulate (index_add), unlike the scatter's distinct rows.
        grad_src = grad.new_zeros((ctx.total, grad.shape[1])).index_add_(0, rows, grad)
        return grad_src, None


def scatter_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """dst with dst[rows[m]] = src[m]: the projector's merge of image tokens into the packed buffer.

    dst: (total, D) contiguous; rows: (M,) int64, distinct, in [0, total); src: (M, D) in dst's dtype.
    With the extension dst is written in place (autograd sees an in-place op) and returned; the
    reference returns a new tensor. Use the returned tensor either way. Differentiable in dst and src.
    """
    _check_rows("scatter_rows", dst, rows)
    if src.dim() != 2 or src.shape != (rows.numel(), dst.shape[1]) or src.dtype != dst.dtype:
        raise ValueError(
            f"scatter_rows: src must be ({rows.numel()}, {dst.shape[1]}) {dst.dtype}, got {tuple(src.shape)} {src.dtype}"
        )
    if _use_extension("scatter_rows", impl, dst.device):
        if not dst.is_contiguous():
            raise ValueError("scatter_rows: dst must be contiguous for the in-place extension kernel")
        return _ScatterRows.apply(dst, rows, src)
    return scatter_rows_reference(dst, rows, src)


def gather_rows(src: torch.Tensor, rows: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """src[rows] (M, D) from src (total, D) and rows (M,) int64 in [0, total). Differentiable in src."""
    _check_rows("gather_rows", src, rows)
    if _use_extension("gather_rows", impl, src.device):
        return _GatherRows.apply(src, rows)
    return gather_rows_reference(src, rows)


def build_extension(build_dir: str | Path, verbose: bool = False) -> str:
    """Compile the CPU part of csrc/ into ``build_dir`` with torch.utils.cpp_extension.load and load it.

    For tests and checkouts where ``make setup`` did not build vlm_core._ext; needs a C++ compiler and
    ninja. Reuses an up-to-date build in build_dir. Returns how it was loaded.
    """
    if _registered():
        return "already loaded in this process"
    from torch.utils.cpp_extension import load

    Path(build_dir).mkdir(parents=True, exist_ok=True)
    load(
        name="vlm_ext_cpu", sources=[str(CSRC / "vlm_ext.cpp")], build_directory=str(build_dir),
        extra_cflags=["-O2"], is_python_module=False, verbose=verbose,
    )  # fmt: skip
    load_extension.cache_clear()
    _log_fallback.cache_clear()
    return f"built and loaded from {build_dir}"


__all__ = [
    "EXT_IMPLS",
    "build_extension",
    "extension_status",
    "gather_rows",
    "gather_rows_reference",
    "load_extension",
    "packed_metadata",
    "packed_metadata_reference",
    "scatter_rows",
    "scatter_rows_reference",
]
