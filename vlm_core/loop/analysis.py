"""Analyse an evaluation: error rate per category, the most frequent confusions, a ranked list of weaknesses.

Input: the per-sample predictions of :class:`vlm_core.types.EvalReport` (``skill``, ``answer``,
``reference``, ``score``) and, optionally, the world's scene graphs to measure caption hallucination.
Pure functions; nothing here reads or writes files.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from curation.sources.world.oracle import (
    caption_hallucinations,
    normalize,
    parse_caption,
)
from curation.sources.world.scene import Scene

PASS_SCORE = 0.999  # a prediction scoring below this is a bad case (captions score object F1 in [0, 1])


@dataclass
class CategoryStats:
    """One category's held-out result."""

    n: int
    accuracy: float  # mean score
    chance: float
    error_rate: float  # share of bad cases (score < PASS_SCORE)
    score: float  # accuracy above chance, (acc - chance) / (1 - chance), clipped to [0, 1]
    confusions: list[tuple[str, str, int]] = field(default_factory=list)  # (reference, answer, count), most first
    off_by_one: int = 0  # count only: answers one away from the reference


@dataclass
class Analysis:
    """Everything the sampler and the report need from one round's evaluation."""

    categories: dict[str, CategoryStats]
    weaknesses: list[str]  # categories, weakest (lowest score) first
    bad_cases: list[dict[str, Any]]  # predictions that failed, with their category
    caption_hallucination_rate: float | None = None  # hallucinated phrases / caption phrases; None without captions

    def scores(self, vs_chance: bool = True) -> dict[str, float]:
        return {name: (c.score if vs_chance else c.accuracy) for name, c in self.categories.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "categories": {
                name: {**{k: v for k, v in c.__dict__.items() if k != "confusions"},
                       "confusions": [list(item) for item in c.confusions]}
                for name, c in self.categories.items()
            },
            "weaknesses": self.weaknesses,
            "bad_cases": len(self.bad_cases),
            "caption_hallucination_rate": self.caption_hallucination_rate,
        }


def score_above_chance(accuracy: float, chance: float) -> float:
    """Accuracy rescaled so that chance is 0 and perfect is 1 (spatial at 0.5 on two answers is all error)."""
    if math.isnan(chance) or chance >= 1.0:  # NaN (unknown chance) or a degenerate skill
        return min(1.0, max(0.0, accuracy))
    return min(1.0, max(0.0, (accuracy - chance) / (1.0 - chance)))


def analyse(
    predictions: Sequence[dict[str, Any]],
    chance: dict[str, float],
    scene_of: Callable[[str], Scene | None] | None = None,
    top_confusions: int = 5,
) -> Analysis:
    """Per-category statistics of ``predictions`` (rows of ``EvalReport.predictions``), weakest first."""
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in predictions:
        by_category[row["skill"]].append(row)
    categories: dict[str, CategoryStats] = {}
    bad_cases = []
    for name, rows in sorted(by_category.items()):
        bad = [row for row in rows if row["score"] < PASS_SCORE]
        bad_cases += bad
        accuracy = sum(row["score"] for row in rows) / len(rows)
        level = chance.get(name, float("nan"))
        confusions = Counter(
            (normalize(row["reference"]), normalize(row["answer"])) for row in bad if name != "caption"
        )
        off_by_one = 0
        if name == "count":
            off_by_one = sum(n for (ref, ans), n in confusions.items() if _off_by_one(ref, ans))
        categories[name] = CategoryStats(
            n=len(rows), accuracy=accuracy, chance=level, error_rate=len(bad) / len(rows),
            score=score_above_chance(accuracy, level),
            confusions=[(ref, ans, n) for (ref, ans), n in confusions.most_common(top_confusions)],
            off_by_one=off_by_one,
        )
    weaknesses = sorted(categories, key=lambda name: (categories[name].score, name))
    rate = None
    if scene_of is not None and "caption" in by_category:
        rate = caption_hallucination_rate(by_category["caption"], scene_of)
    return Analysis(categories, weaknesses, bad_cases, rate)


def caption_hallucination_rate(rows: Sequence[dict[str, Any]], scene_of: Callable[[str], Scene | None]) -> float:
    """Hallucinated phrases (objects or attributes not in the scene graph) over all predicted caption phrases."""
    hallucinated = total = 0
    for row in rows:
        scene = scene_of(row["id"])
        if scene is None:
            continue
        total += len(parse_caption(row["answer"]))
        hallucinated += len(caption_hallucinations(scene, row["answer"]))
    return hallucinated / total if total else 0.0


def _off_by_one(reference: str, answer: str) -> bool:
    try:
        return abs(int(reference) - int(answer)) == 1
    except ValueError:
        return False
