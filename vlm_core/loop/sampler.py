"""Adaptive bad-case sampling (MLLM-DataEngine): split a round's data budget across categories by error.

    weight_c = (1 - score_c) ** (1 / temperature)            adaptive (score in [0, 1], 1 = solved)
    share_c  = floor / K + (1 - floor) * weight_c / sum(w)    every category keeps floor/K of the budget
    n_c      = largest-remainder rounding of share_c * budget  integers that sum exactly to the budget

``uniform`` spreads the same budget evenly; ``none`` asks for nothing (the control arm). Pure functions.
"""

from __future__ import annotations

import math

from vlm_core.loop.config import STRATEGIES, SamplerConfig


def budget_shares(scores: dict[str, float], strategy: str, temperature: float = 1.0, floor: float = 0.0) -> dict[str, float]:
    """Each category's share of the budget (sums to 1; all 0 for ``none``). ``scores`` in [0, 1], 1 = solved."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; expected one of {list(STRATEGIES)}")
    if not scores or strategy == "none":
        return {name: 0.0 for name in scores}
    names = sorted(scores)
    even = 1.0 / len(names)
    if strategy == "uniform":
        return {name: even for name in names}
    bad = {name: scores[name] for name in names if not 0.0 <= scores[name] <= 1.0}
    if bad:
        raise ValueError(f"scores {bad} are outside [0, 1]; pass accuracy or accuracy above chance")
    weights = {name: (1.0 - scores[name]) ** (1.0 / temperature) for name in names}
    total = sum(weights.values())
    if total <= 0:  # every category solved: nothing is weaker than anything else
        return {name: even for name in names}
    return {name: floor * even + (1.0 - floor) * weights[name] / total for name in names}


def split_budget(shares: dict[str, float], budget: int) -> dict[str, int]:
    """Integer counts from shares by largest remainder: they sum exactly to ``budget`` (0 when all shares are 0)."""
    if budget < 0:
        raise ValueError(f"budget={budget} must be >= 0")
    total = sum(shares.values())
    if total <= 0 or budget == 0:
        return {name: 0 for name in shares}
    exact = {name: budget * share / total for name, share in shares.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    left = budget - sum(counts.values())
    # Ties broken by name so the split is deterministic.
    order = sorted(exact, key=lambda name: (-(exact[name] - counts[name]), name))
    for name in order[:left]:
        counts[name] += 1
    return counts


def plan_increment(scores: dict[str, float], strategy: str, cfg: SamplerConfig) -> dict[str, int]:
    """The number of new samples per category for the next round (restricted to ``cfg.categories`` if set)."""
    if cfg.categories:
        scores = {name: value for name, value in scores.items() if name in set(cfg.categories)}
    budget = 0 if strategy == "none" else cfg.budget
    return split_budget(budget_shares(scores, strategy, cfg.temperature, cfg.floor), budget)
