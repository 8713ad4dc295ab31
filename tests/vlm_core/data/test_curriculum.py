from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlm_core.data.curriculum import CurriculumStream, sample_difficulty
from vlm_core.types import Sample, Turn


def make_difficulty(seed: int, n: int = 300) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 7, size=n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cap_rises_and_batches_respect_it(seed: int) -> None:
    difficulty = make_difficulty(seed)
    stream = CurriculumStream(difficulty, batch_size=16, seed=seed, start=1, steps=30)
    caps = []
    for step in range(30):
        cap = stream.cap(step)
        batch = next(stream)
        assert len(batch) == 16
        assert difficulty[batch].max() <= cap, f"step {step}: drew difficulty {difficulty[batch].max()} over cap {cap}"
        caps.append(cap)
    assert caps[0] == 1 and caps[-1] == 6 and caps == sorted(caps)
    # After the curriculum: a full pass over every sample, as the plain stream does.
    seen = [i for _ in range(300 // 16 + 1) for i in next(stream)]
    assert set(seen[:300]) == set(range(300))


def test_resume_gives_the_same_batches() -> None:
    difficulty = make_difficulty(5)
    reference = CurriculumStream(difficulty, 8, seed=3, start=2, steps=20)
    expected = [next(reference) for _ in range(40)]
    first = CurriculumStream(difficulty, 8, seed=3, start=2, steps=20)
    for _ in range(13):
        next(first)
    resumed = CurriculumStream(difficulty, 8, seed=3, start=2, steps=20)
    resumed.load_state_dict(first.state_dict())
    assert [next(resumed) for _ in range(27)] == expected[13:]


def test_small_pool_draws_with_replacement() -> None:
    difficulty = np.array([1, 6, 6, 6, 6])
    batch = next(CurriculumStream(difficulty, 4, seed=0, start=1, steps=10))
    assert batch == [0, 0, 0, 0]


def test_start_below_easiest_sample_starts_at_the_easiest() -> None:
    stream = CurriculumStream(np.array([3, 4, 5, 3]), 2, seed=0, start=1, steps=6)
    assert stream.cap(0) == 3
    assert set(next(stream)) <= {0, 3}


def test_sample_difficulty_reads_meta() -> None:
    def sample(meta: dict) -> Sample:
        return Sample(id="x", source="f.json", image_paths=(Path("a.png"),), turns=(Turn("user", "q"),), meta=meta)

    assert sample_difficulty([sample({"n_objects": 3}), sample({})]).tolist() == [3, 0]
    with pytest.raises(ValueError, match=r"f\.json.*meta\.n_objects"):
        sample_difficulty([sample({"n_objects": "three"})])
