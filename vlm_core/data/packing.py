"""Packing: several tokenized samples back to back in fixed-length rows, plus the resumable sample order.

- ``pack`` places samples into rows by first-fit-decreasing and builds the ``PackedBatch`` of DESIGN.md's
  contract (``cu_seqlens``, ``bidir_group``, shifted ``labels``).
- ``SampleStream`` is the deterministic, endless order in which samples are drawn, with a two-number state.
- ``PackedLoader`` joins the two over a dataset.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vlm_core.data.dataset import SFTDataset
from vlm_core.types import IGNORE_INDEX, PackedBatch, TokenizedSample


def _chunks(size: int, limit: int) -> list[int]:
    """``size`` split into pieces of at most ``limit`` (the last one shorter); [] for size 0."""
    return [min(limit, size - start) for start in range(0, size, limit)]


def pack(samples: Sequence[TokenizedSample], row_len: int, pad_id: int = 0, pad_rows: bool = True) -> PackedBatch:
    """Pack ``samples`` into rows of ``row_len`` slots with first-fit-decreasing (FFD).

    Samples are taken longest first (ties by position, so the result is deterministic) and each goes into
    the first row with room for it; a new row is opened when none has. FFD needs at most 11/9 · OPT + 6/9
    rows (Dósa 2007). In the flat stream (row 0, then row 1, ...) each row holds its samples in placement
    order followed by its padding, which forms its own segments (each at most as long as the longest
    sample, so padding never raises ``max_seqlen``), so:

    - ``cu_seqlens``: ``[n_segments + 1]`` int32 with one segment per sample and per padded row end;
      ``cu_seqlens[-1] == rows * row_len``. ``position_ids`` restart at 0 in every segment.
    - ``bidir_group``: ``[total]`` int32; the images are renumbered 1..N_img in stream order, so an id is
      unique in the batch (two samples' "image 1" never share a group).
    - ``labels``: ``[total]`` int64; ``labels[t] = input_ids[t + 1]`` when ``loss_mask[t + 1]`` and t + 1 is in
      the same sample, else ``IGNORE_INDEX``; the model computes ``cross_entropy(logits, labels)`` unshifted.
    - ``images``: ``[N_img, C, H, W]`` in the order their tokens appear in ``input_ids`` (FFD reorders
      samples, so this is not the input order).
    - padding slots hold ``pad_id``, bidir group 0 and no label.

    With ``pad_rows=False`` no padding is written: the stream is the samples back to back in the same order
    (``total == num_real_tokens``), so no layer computes on padding; the shape then changes from batch to
    batch (see :func:`pad_rows_for`).

    Raises ValueError when a sample is longer than ``row_len`` (naming it), or its tensors disagree.
    """
    if row_len < 1:
        raise ValueError(f"row_len={row_len}; must be a positive number of token slots")
    if not samples:
        raise ValueError("pack() got no samples; a batch needs at least one")
    lengths = [_checked_length(sample, row_len) for sample in samples]
    _check_image_shapes(samples)

    rows: list[list[int]] = []  # sample indices per row, in placement order
    free: list[int] = []  # free slots per row
    for index in sorted(range(len(samples)), key=lambda i: (-lengths[i], i)):
        for row, space in enumerate(free):
            if lengths[index] <= space:
                rows[row].append(index)
                free[row] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(row_len - lengths[index])

    input_ids: list[torch.Tensor] = []
    position_ids: list[torch.Tensor] = []
    bidir_group: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    seqlens: list[int] = []
    images: list[torch.Tensor] = []
    images_before = 0  # images already placed in the stream; offsets this sample's group ids
    for row, members in enumerate(rows):
        for index in members:
            sample, length = samples[index], lengths[index]
            ids = sample.input_ids.to(torch.int64)  # [T]
            groups = sample.bidir_group.to(torch.int32)  # [T]
            input_ids.append(ids)
            position_ids.append(torch.arange(length, dtype=torch.int64))
            bidir_group.append(torch.where(groups > 0, groups + images_before, 0).to(torch.int32))
            shifted = torch.full((length,), IGNORE_INDEX, dtype=torch.int64)  # [T]
            # The last token of a sample predicts nothing: its successor is another sample or padding.
            shifted[:-1] = torch.where(sample.loss_mask[1:], ids[1:], IGNORE_INDEX)
            labels.append(shifted)
            seqlens.append(length)
            images.append(sample.images)
            images_before += sample.images.shape[0]
        # Padding is cut into segments no longer than the longest sample, so it never raises max_seqlen:
        # attention cost grows with max_seqlen^2 per segment, and one 400-slot padding segment beside
        # 30-token samples made the reference attention ~100x more expensive than the samples needed.
        for padding in _chunks(free[row], max(lengths)) if pad_rows else ():
            input_ids.append(torch.full((padding,), pad_id, dtype=torch.int64))
            position_ids.append(torch.arange(padding, dtype=torch.int64))
            bidir_group.append(torch.zeros(padding, dtype=torch.int32))
            labels.append(torch.full((padding,), IGNORE_INDEX, dtype=torch.int64))
            seqlens.append(padding)

    cu_seqlens = torch.zeros(len(seqlens) + 1, dtype=torch.int32)  # [n_segments + 1]
    cu_seqlens[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int64), 0).to(torch.int32)
    return PackedBatch(
        input_ids=torch.cat(input_ids),  # [total]
        position_ids=torch.cat(position_ids),  # [total]
        cu_seqlens=cu_seqlens,
        max_seqlen=max(seqlens),
        bidir_group=torch.cat(bidir_group),  # [total]
        labels=torch.cat(labels),  # [total]
        images=torch.cat(images),  # [N_img, C, H, W]; text-only samples contribute [0, C, H, W]
        rows=len(rows),
        row_len=row_len,
        num_samples=len(samples),
        num_real_tokens=sum(lengths),
    )


def pad_rows_for(device: torch.device | str, setting: bool | None) -> bool:
    """Whether packed rows are padded to ``row_len`` on ``device``: ``setting`` (``data.pad_rows``) when given,
    else padded on the CPU and not on a GPU.

    Padding keeps every batch the same shape; nothing here needs that (attention reads ``cu_seqlens``, and no
    step is captured in a CUDA graph), and on a GPU it is compute spent on nothing: 13% of the slots of a
    64-sample batch of ``small`` in benchmarks/bench_train.py. On the CPU it stays by default because the
    committed CPU runs (README, benchmarks/results) were measured padded, and a different row count changes
    the float rounding of their sums (the losses agree to about 5 digits, then drift apart).
    """
    if setting is not None:
        return bool(setting)
    return torch.device(device).type != "cuda"


def _checked_length(sample: TokenizedSample, row_len: int) -> int:
    """Length T of a sample after checking that its tensors agree with each other and fit a row."""
    name = sample.sample_id or "<unnamed>"
    length = sample.input_ids.shape[0]
    if sample.input_ids.dim() != 1 or sample.loss_mask.shape != (length,) or sample.bidir_group.shape != (length,):
        raise ValueError(
            f"sample {name!r}: input_ids {tuple(sample.input_ids.shape)}, loss_mask {tuple(sample.loss_mask.shape)} "
            f"and bidir_group {tuple(sample.bidir_group.shape)} must all be [T]"
        )
    if sample.loss_mask.dtype != torch.bool:
        raise ValueError(f"sample {name!r}: loss_mask is {sample.loss_mask.dtype}, expected torch.bool")
    if length == 0:
        raise ValueError(f"sample {name!r} has no tokens")
    if length > row_len:
        raise ValueError(
            f"sample {name!r} has {length} tokens, more than the row length {row_len}; raise data.row_len to at "
            f"least {length}, or drop samples longer than data.row_len before training"
        )
    num_images = sample.images.shape[0] if sample.images.dim() == 4 else -1
    if num_images < 0:
        raise ValueError(f"sample {name!r}: images has shape {tuple(sample.images.shape)}, expected [N_img, C, H, W]")
    # The k-th image's span must be contiguous and appear in order 1, 2, ..., so that image k of the
    # sample is images[k - 1] and the batch's images can follow token order.
    groups = sample.bidir_group[sample.bidir_group != 0]
    spans = torch.unique_consecutive(groups)
    if not torch.equal(spans.to(torch.int64), torch.arange(1, num_images + 1)):
        raise ValueError(
            f"sample {name!r}: bidir_group has image spans {spans.tolist()} but the sample has {num_images} image(s); "
            "expected contiguous spans numbered 1..N_img in order"
        )
    return length


def _check_image_shapes(samples: Sequence[TokenizedSample]) -> None:
    shapes = {tuple(sample.images.shape[1:]) for sample in samples}
    if len(shapes) != 1:
        raise ValueError(
            f"samples' images have different [C, H, W] shapes {sorted(shapes)}; use one ImageProcessor for the batch"
        )


class SampleStream:
    """Deterministic endless stream of sample-index batches; resumable from ``{"epoch", "offset"}``.

    Epoch e visits every sample once in the order ``np.random.default_rng([seed, e]).permutation(n)``: a
    permutation depends only on (seed, epoch), so it can be rebuilt on resume without replaying earlier
    epochs. A batch that reaches the end of an epoch is completed from the next one, so every batch has
    exactly ``batch_size`` indices and no sample is dropped.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}; the stream needs at least one sample")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; must be >= 1")
        if seed < 0:
            raise ValueError(f"seed={seed}; numpy's SeedSequence needs a non-negative integer")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.offset = 0  # next position in the current epoch's permutation
        self._permutation_epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            order = self._order(self.epoch)
            take = min(self.batch_size - len(batch), self.num_samples - self.offset)
            batch.extend(order[self.offset : self.offset + take].tolist())
            self.offset += take
            if self.offset == self.num_samples:
                self.epoch += 1
                self.offset = 0
        return batch

    def state_dict(self) -> dict[str, int]:
        """Where the next batch starts: ``{"epoch": e, "offset": position in epoch e's permutation}``."""
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``state_dict()``; the next batch is the one the saved stream would have produced."""
        missing = {"epoch", "offset"} - set(state)
        if missing:
            raise ValueError(f"SampleStream state is missing {sorted(missing)}; expected the dict from state_dict()")
        epoch, offset = state["epoch"], state["offset"]
        for key, value in (("epoch", epoch), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"SampleStream state {key}={value!r} must be an integer")
        if epoch < 0 or not 0 <= offset < self.num_samples:
            raise ValueError(
                f"SampleStream state epoch={epoch}, offset={offset} does not fit a stream of "
                f"{self.num_samples} samples "
                "(need epoch >= 0 and 0 <= offset < num_samples); was the checkpoint saved with another dataset?"
            )
        self.epoch, self.offset = int(epoch), int(offset)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._permutation_epoch:
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._permutation_epoch = epoch
        return self._permutation


class PackedLoader:
    """Endless iterator of ``PackedBatch``es: each index batch of ``stream`` is fetched and packed.

    ``state_dict()`` after receiving batch k resumes at batch k + 1 (batches are built on demand, with no
    read-ahead, so the stream's position is exactly what has been handed out).
    """

    def __init__(
        self, dataset: SFTDataset, stream: SampleStream, row_len: int, pad_id: int | None = None, pad_rows: bool = True
    ) -> None:
        if len(dataset) != stream.num_samples:
            raise ValueError(
                f"stream draws from {stream.num_samples} samples but the dataset has {len(dataset)}; "
                "build the stream with num_samples=len(dataset)"
            )
        if row_len < 1:
            raise ValueError(f"row_len={row_len}; must be a positive number of token slots")
        self.dataset = dataset
        self.stream = stream
        self.row_len = row_len
        self.pad_id = dataset.encoder.pad_token_id if pad_id is None else pad_id
        self.pad_rows = pad_rows

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        indices = next(self.stream)
        samples = [self.dataset[index] for index in indices]
        return pack(samples, self.row_len, pad_id=self.pad_id, pad_rows=self.pad_rows)

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stream.load_state_dict(state)
