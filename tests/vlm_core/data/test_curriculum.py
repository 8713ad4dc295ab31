from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlm_core.data.curriculum import CurriculumStream, sample_difficulty, sample_in_skills
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


@pytest.mark.parametrize("seed", [0, 1])
def test_focus_phase_draws_only_focus_samples_then_all(seed: int) -> None:
    rng = np.random.default_rng(seed)
    difficulty = rng.integers(1, 7, size=400)
    focus = rng.random(400) < 0.3
    stream = CurriculumStream(difficulty, 16, seed=seed, start=1, steps=10, focus=focus, focus_steps=25)
    for step in range(25):
        cap = stream.cap(step)
        batch = next(stream)
        assert focus[batch].all(), f"step {step}: drew a sample outside the focus skills"
        assert difficulty[batch].max() <= max(cap, stream.focus_start)
    # After the focus phase the cap is at its top and every sample is drawn again, focus or not.
    seen = {i for _ in range(400 // 16 + 1) for i in next(stream)}
    assert seen == set(range(400))


def test_focus_phase_outlasting_the_cap_and_resuming() -> None:
    difficulty = make_difficulty(7)
    focus = np.arange(len(difficulty)) % 4 == 0
    reference = CurriculumStream(difficulty, 8, seed=1, start=1, steps=5, focus=focus, focus_steps=12)
    expected = [next(reference) for _ in range(30)]
    assert all(focus[batch].all() for batch in expected[:12])
    assert not all(focus[batch].all() for batch in expected[12:])
    first = CurriculumStream(difficulty, 8, seed=1, start=1, steps=5, focus=focus, focus_steps=12)
    for _ in range(9):
        next(first)
    resumed = CurriculumStream(difficulty, 8, seed=1, start=1, steps=5, focus=focus, focus_steps=12)
    resumed.load_state_dict(first.state_dict())
    assert [next(resumed) for _ in range(21)] == expected[9:]


def test_focus_cap_starts_at_the_easiest_focus_sample() -> None:
    difficulty = np.array([1, 1, 4, 5, 4])
    focus = np.array([False, False, True, True, True])
    stream = CurriculumStream(difficulty, 3, seed=0, start=1, steps=6, focus=focus, focus_steps=6)
    assert set(next(stream)) <= {2, 4}  # the cap is 1 at step 0, but no focus sample is that easy


def test_focus_without_focus_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one sample in focus"):
        CurriculumStream(np.array([1, 2]), 2, seed=0, start=1, steps=2, focus=np.zeros(2, bool), focus_steps=3)


def test_sample_in_skills() -> None:
    def sample(skill: str | None) -> Sample:
        return Sample(id="x", source="f.json", image_paths=(), turns=(Turn("user", "q"),), skill=skill)

    mask = sample_in_skills([sample("color"), sample("count"), sample(None), sample("shape")], ["color", "shape"])
    assert mask.tolist() == [True, False, False, True]
