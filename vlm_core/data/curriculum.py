"""A curriculum from easy to hard samples, as a resumable stream of sample-index batches.

Why: with the tower frozen, a decoder trained on scenes of 1-6 objects from the first step learns the
skills that need no selection (count: "how many cells are not empty") but stays at chance on those that
must find one object among several ("what color is the circle?"). Starting from scenes with one object
(copy the attribute of the only non-empty cell) and letting the cap on objects per scene rise makes
the selection learnable: the prototype this project started from used such a curriculum.

A *focus* phase orders skills the same way. Skills that need no question-image interaction (count, OCR,
captions: "how many cells are not empty") are learned from any mix, but in the full mix they also crowd
out the slow, interaction-heavy ones. Measured on this CPU (image after the question, 1 turn per record,
one run each): colour, shape, grounding and existence alone reach 0.99/0.87/0.97/0.87 after 2000 steps;
inside the 8-skill mix, 2800 steps, they stay at 0.65/0.97/0.37/0.47. The same mix with those four as
focus skills for the first half reaches 0.99/1.00/0.99/0.95 (seed 0) and 0.99/0.99/0.99/0.95 (seed 1).
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


def sample_in_skills(samples: Sequence[Sample], skills: Sequence[str]) -> np.ndarray:
    """``[N]`` bool: whether each sample's skill tag is one of ``skills`` (untagged samples never are)."""
    wanted = set(skills)
    return np.asarray([sample.skill in wanted for sample in samples], dtype=bool)


class CurriculumStream:
    """Batches of ``batch_size`` indices; for the first ``steps`` batches only samples with
    ``difficulty <= cap`` are drawn, the cap rising linearly from ``start`` to the hardest difficulty.
    With a ``focus`` mask, the first ``focus_steps`` batches also draw only from the focus samples
    (under the same cap, which for them starts at their easiest). After both, the plain
    epoch-permutation :class:`SampleStream`.

    Curriculum batch k is drawn (without replacement where the pool allows) by
    ``default_rng([seed, 7919, k])``, so the state is just the batch counter plus the inner stream's.
    """

    def __init__(
        self, difficulty: np.ndarray, batch_size: int, seed: int, start: int, steps: int,
        focus: np.ndarray | None = None, focus_steps: int = 0,
    ) -> None:
        if steps < 0 or focus_steps < 0:
            raise ValueError(f"curriculum steps={steps} and focus_steps={focus_steps} must be >= 0")
        if len(difficulty) == 0:
            raise ValueError("CurriculumStream needs at least one sample")
        focus = None if focus is None else np.asarray(focus, dtype=bool)
        if focus_steps and (focus is None or focus.shape != difficulty.shape or not focus.any()):
            raise ValueError(
                f"CurriculumStream: focus_steps={focus_steps} needs a boolean focus mask over the {len(difficulty)} "
                "samples with at least one sample in focus (is any sample of the focus skills in the training data?)"
            )
        # A cap below the easiest sample would leave the first batches empty: start at the easiest instead
        # (e.g. data.world.min_objects=3 with the default curriculum_start=1).
        self.focus = focus if focus_steps else None
        self.focus_steps = focus_steps
        self.focus_start = max(start, int(difficulty[focus].min())) if self.focus is not None else start
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
        self._pools: dict[tuple[int, bool], np.ndarray] = {}

    def cap(self, step: int) -> int:
        """Largest difficulty allowed in batch ``step`` (0-based)."""
        if step >= self.steps:
            return self.hardest
        return min(self.hardest, self.start + int((self.hardest - self.start + 1) * step / self.steps))

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def pool(self, step: int) -> np.ndarray:
        """Indices batch ``step`` draws from (only meaningful while ``step < max(steps, focus_steps)``)."""
        in_focus = step < self.focus_steps
        cap = max(self.cap(step), self.focus_start) if in_focus else self.cap(step)
        key = (cap, in_focus)
        if key not in self._pools:
            allowed = self.difficulty <= cap
            self._pools[key] = np.flatnonzero(allowed & self.focus if in_focus else allowed)
        return self._pools[key]

    def __next__(self) -> list[int]:
        if self.step < max(self.steps, self.focus_steps):
            pool = self.pool(self.step)
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
