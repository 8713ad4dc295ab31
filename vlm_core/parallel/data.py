"""Data parallelism on the data side: every DP rank takes its share of one global batch stream.

All ranks draw the same global batch of sample indices (the stream is seeded by the job, not by the
rank) and DP rank r keeps indices ``r, r + dp, r + 2 dp, ...`` of it. The union over the ranks is the
batch a single process would train on, so DP=2 with the batch split reproduces DP=1 with the whole batch
(up to summation order), and the stream's position, the same on every rank, is what a checkpoint saves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class DataParallelStream:
    """Wraps a stream of index batches (``SampleStream``, ``CurriculumStream``): yields this rank's share."""

    def __init__(self, stream: Any, dp_rank: int, dp_size: int) -> None:
        if stream.batch_size % dp_size:
            raise ValueError(
                f"a micro-batch of {stream.batch_size} samples (train.batch_size / train.grad_accum) does not split "
                f"evenly over {dp_size} data-parallel ranks; make it a multiple of {dp_size}"
            )
        self.stream = stream
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def num_samples(self) -> int:
        return self.stream.num_samples

    @property
    def batch_size(self) -> int:
        return self.stream.batch_size // self.dp_size

    def __iter__(self) -> DataParallelStream:
        return self

    def __next__(self) -> list[int]:
        return next(self.stream)[self.dp_rank :: self.dp_size]

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stream.load_state_dict(state)
