"""Which keys each query of a packed batch sees, as per-token [start, end) windows.

The Triton packed-attention kernels (packed_attention_kernels.py) read these vectors per tile to
decide which tiles to visit at all and which need no per-element mask.

Image spans are contiguous runs of one non-zero id inside a segment, so token i sees exactly the
keys j in ``[seg_start[i], kv_end[i])``: the segment start, up to ``kv_end[i] = max(i + 1, end of
i's image span)``. (Every key before i in the segment is allowed by causality; a key after i is
allowed only inside i's own span, which is contiguous.) By the same argument key j is seen exactly
by the queries in ``[q_start[j], seg_end[j])``, with ``q_start[j]`` = the start of j's image span
(j itself for text). :func:`packed_attention_windows` computes the four vectors with torch ops on
the tensors' device; no Python loop over tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vlm_core.kernels.attention_reference import segment_ids


class AttentionWindows(NamedTuple):
    """Per-token attention windows of a packed batch, each ``[total]`` int32.

    Query i sees keys ``[seg_start[i], kv_end[i])``; key j is seen by queries
    ``[q_start[j], seg_end[j])``. Both describe the same mask as ``packed_attention_mask``.
    """

    seg_start: torch.Tensor  # first token of i's segment
    kv_end: torch.Tensor  # max(i + 1, end of i's image span), exclusive
    q_start: torch.Tensor  # start of j's image span, or j for text
    seg_end: torch.Tensor  # end of j's segment, exclusive


def packed_attention_windows(
    cu_seqlens: torch.Tensor, bidir_group: torch.Tensor | None, total: int
) -> AttentionWindows:
    """The [start, end) windows of the packed-attention mask (see the module docstring).

    cu_seqlens: (n + 1,) int32, valid as checked by ``vlm_core.kernels.packed_attention``.
    bidir_group: (total,) int32 or None. Each image (a non-zero id) must be one contiguous run of
        tokens inside its segment; an id that reappears later in the same segment after other
        tokens cannot be expressed as a window and raises ValueError. The check reads one bool on
        the host (one device sync). The same id in different segments is fine: those are
        different images, since attention never crosses segments.
    """
    device = cu_seqlens.device
    positions = torch.arange(total, device=device)  # [total] int64
    bounds = cu_seqlens.long()  # [n + 1]
    segment = segment_ids(cu_seqlens, total)  # [total] int64
    seg_start = bounds[segment]
    seg_end = bounds[segment + 1]
    if bidir_group is None:
        return AttentionWindows(
            seg_start.int(), (positions + 1).int(), positions.int(), seg_end.int()
        )

    groups = bidir_group.long()
    previous = torch.cat([groups[:1], groups[:-1]])
    # A run is a maximal stretch of equal ids inside one segment; an image span is a run of a
    # non-zero id. Runs break at segment starts, so equal ids in adjacent segments stay apart.
    run_begins = (positions == seg_start) | (groups != previous)  # [total] bool
    # Start of i's run: the latest run start at or before i. End of i's run: the earliest run
    # end at or after i (a reversed running minimum).
    run_start = torch.where(run_begins, positions, 0).cummax(0).values
    run_ends_here = torch.cat([run_begins[1:], run_begins.new_ones(1)])
    run_end = torch.where(run_ends_here, positions + 1, total).flip(0).cummin(0).values
    run_end = run_end.flip(0)
    image = groups != 0
    _check_images_contiguous(positions, segment, groups, image)
    kv_end = torch.where(image, run_end, positions + 1)
    q_start = torch.where(image, run_start, positions)
    return AttentionWindows(seg_start.int(), kv_end.int(), q_start.int(), seg_end.int())


def _check_images_contiguous(
    positions: torch.Tensor,
    segment: torch.Tensor,
    groups: torch.Tensor,
    image: torch.Tensor,
) -> None:
    """Raise ValueError if one (segment, image id) pair covers two separate runs of tokens."""
    # Sort image tokens by (segment, id); text tokens get unique negative keys. Each image is
    # contiguous iff neighbours with equal keys sit at consecutive positions.
    key = torch.where(image, (segment << 32) | (groups & 0xFFFFFFFF), -1 - positions)
    sorted_key, order = torch.sort(key, stable=True)
    sorted_positions = positions[order]
    split = (sorted_key[1:] == sorted_key[:-1]) & (
        sorted_positions[1:] - sorted_positions[:-1] != 1
    )
    if bool(split.any()):
        at = int(split.nonzero()[0, 0])
        before, after = int(sorted_positions[at]), int(sorted_positions[at + 1])
        raise ValueError(
            f"packed_attention_triton: bidir_group id {int(groups[after])} covers tokens "
            f"{before} and {after} of segment {int(segment[after])} but not all tokens "
            "between them; the Triton kernel needs each image to be one contiguous span. "
            "Give each image its own id (vlm_core.data.packing does), or use impl='reference'"
        )


__all__ = ["AttentionWindows", "packed_attention_windows"]
