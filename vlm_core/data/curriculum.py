"""A curriculum from easy to hard samples, as a resumable stream of sample-index batches.

Why: with the tower frozen, a decoder trained on scenes of 1-6 objects from the first step learns the
skills that need no selection (count: "how many cells are not empty") but stays at chance on those that
must find one object among several ("what color is the circle?"). Starting from scenes with one object
(copy the attribute of the only non-empty cell) and letting the cap on objects per scene rise makes
the selection learnable: the prototype this project started from used such a curriculum.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from vlm_core.data.packing import SampleStream
from vlm_core.types import Sample

# Keeps the curriculum's draws independent of SampleStream's permutations, which use [seed, epoch].
_CURRICULUM_STREAM_ID = 7_919


def sample_difficulty(samples: Sequence[Sample], key: str = "n_objects") -> np.ndarray:
    """``[N]`` int64 difficulty of each sample from ``meta[key]``; 0 (always eligible) where it is absent."""
    values = []
    for sample in samples:
        value = sample.meta.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"sample {sample.id} ({sample.source}): meta.{key}={value!r} must be an integer >= 0")
        values.append(value)
    return np.asarray(values, dtype=np.int64)


class CurriculumStream:
    """Batches of ``batch_size`` indices; for the first ``steps`` batches only samples with
    ``difficulty <= cap`` are drawn, the cap rising linearly from ``start`` to the hardest difficulty.
    After that, the plain epoch-permutation :class:`SampleStream`.

    Curriculum batch k is drawn (without replacement where the pool allows) by
    ``default_rng([seed, 7919, k])``, so the state is just the batch counter plus the inner stream's.
    """

    def __init__(self, difficulty: np.ndarray, batch_size: int, seed: int, start: int, steps: int) -> None:
        if steps < 0:
            raise ValueError(f"curriculum steps={steps} must be >= 0")
        if len(difficulty) == 0:
            raise ValueError("CurriculumStream needs at least one sample")
        # A cap below the easiest sample would leave the first batches empty: start at the easiest instead
        # (e.g. data.world.min_objects=3 with the default curriculum_start=1).
        start = max(start, int(difficulty.min()))
        self.difficulty = difficulty
        self.inner = SampleStream(len(difficulty), batch_size, seed)
        self.num_samples = len(difficulty)
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.steps = steps
        self.hardest = int(difficulty.max())
        self.step = 0
        self._pools: dict[int, np.ndarray] = {}

    def cap(self, step: int) -> int:
        """Largest difficulty allowed in batch ``step`` (0-based)."""
        if step >= self.steps:
            return self.hardest
        return min(self.hardest, self.start + int((self.hardest - self.start + 1) * step / self.steps))

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if self.step < self.steps:
            cap = self.cap(self.step)
            if cap not in self._pools:
                self._pools[cap] = np.flatnonzero(self.difficulty <= cap)
            pool = self._pools[cap]
            rng = np.random.default_rng([self.seed, _CURRICULUM_STREAM_ID, self.step])
            batch = rng.choice(pool, size=self.batch_size, replace=len(pool) < self.batch_size).tolist()
        else:
            batch = next(self.inner)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"curriculum_step": self.step, **self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "curriculum_step" not in state:
            raise ValueError("CurriculumStream state lacks 'curriculum_step'; was it saved without a curriculum?")
        self.inner.load_state_dict({k: v for k, v in state.items() if k != "curriculum_step"})
        self.step = int(state["curriculum_step"])
