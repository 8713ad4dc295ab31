"""The budget split: sums exactly to the budget, respects the per-category floor, is monotone in error."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from vlm_core.loop.config import SamplerConfig
from vlm_core.loop.sampler import budget_shares, plan_increment, split_budget

SKILLS = ("caption", "color", "count", "existence", "grounding", "ocr", "shape", "spatial")


def random_scores(rng: np.random.Generator, k: int) -> dict[str, float]:
    return {SKILLS[i]: float(rng.uniform()) for i in range(k)}


@pytest.mark.parametrize("budget", [0, 1, 7, 999, 3000, 3001])
@pytest.mark.parametrize("strategy", ["adaptive", "uniform"])
def test_split_sums_exactly_to_the_budget(budget: int, strategy: str) -> None:
    rng = np.random.default_rng(budget)
    for trial in range(50):
        scores = random_scores(rng, int(rng.integers(1, len(SKILLS) + 1)))
        cfg = SamplerConfig(budget=budget, temperature=float(rng.uniform(0.3, 3.0)), floor=float(rng.uniform()))
        counts = plan_increment(scores, strategy, cfg)
        assert sum(counts.values()) == budget, (trial, scores, counts)
        assert set(counts) == set(scores) and all(n >= 0 for n in counts.values())


def test_none_asks_for_nothing() -> None:
    counts = plan_increment({"color": 0.1, "spatial": 0.0}, "none", SamplerConfig(budget=3000))
    assert counts == {"color": 0, "spatial": 0}


@pytest.mark.parametrize("floor", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_every_category_keeps_its_floor(floor: float) -> None:
    rng = np.random.default_rng(1)
    budget = 3000
    for _ in range(50):
        scores = random_scores(rng, 8)
        scores["ocr"] = 1.0  # a solved category: its weight is 0, only the floor gives it data
        counts = plan_increment(scores, "adaptive", SamplerConfig(budget=budget, floor=floor))
        floor_count = floor * budget / len(scores)
        # Largest-remainder rounding moves a count by less than one sample.
        assert all(n >= np.floor(floor_count) for n in counts.values()), (floor, counts)
    if floor == 1.0:
        assert len(set(counts.values())) == 1  # floor 1 is the uniform split


def test_shares_are_monotone_in_error() -> None:
    rng = np.random.default_rng(2)
    for _ in range(200):
        scores = random_scores(rng, 8)
        temperature = float(rng.uniform(0.2, 4.0))
        shares = budget_shares(scores, "adaptive", temperature, floor=float(rng.uniform(0, 0.9)))
        ordered = sorted(scores, key=lambda s: scores[s])  # most error first
        values = [shares[s] for s in ordered]
        assert all(a >= b - 1e-12 for a, b in pairwise(values)), (scores, shares)
        counts = split_budget(shares, 3000)
        ordered_counts = [counts[s] for s in ordered]
        # Integer rounding can only break a tie between (near-)equal shares, never reverse an order by more.
        assert all(a >= b - 1 for a, b in pairwise(ordered_counts))


def test_more_error_gets_more_and_temperature_sharpens() -> None:
    scores = {"color": 0.95, "count": 0.9, "spatial": 0.0}
    cold = budget_shares(scores, "adaptive", temperature=0.5, floor=0.0)
    warm = budget_shares(scores, "adaptive", temperature=2.0, floor=0.0)
    assert cold["spatial"] > warm["spatial"] > 1 / 3
    # MLLM-DataEngine's rule at temperature 1: proportional to 1 - score.
    plain = budget_shares(scores, "adaptive", temperature=1.0, floor=0.0)
    assert plain["spatial"] == pytest.approx(1.0 / 1.15) and plain["color"] == pytest.approx(0.05 / 1.15)


def test_uniform_is_even_and_all_solved_falls_back_to_even() -> None:
    assert split_budget(budget_shares({"a": 0.0, "b": 1.0, "c": 0.5}, "uniform"), 9) == {"a": 3, "b": 3, "c": 3}
    assert split_budget(budget_shares({"a": 1.0, "b": 1.0}, "adaptive"), 10) == {"a": 5, "b": 5}


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        budget_shares({"a": 1.5}, "adaptive")
    with pytest.raises(ValueError, match="strategy"):
        budget_shares({"a": 0.5}, "greedy")
    with pytest.raises(ValueError, match="sampler.floor"):
        SamplerConfig(floor=2.0)
