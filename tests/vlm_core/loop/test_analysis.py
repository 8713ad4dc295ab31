"""Error rates, confusions (counts off by one) and the ranked weaknesses of an evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from curation.sources.world import WorldConfig, caption_text, sample_scene
from curation.sources.world.oracle import parse_caption
from vlm_core.loop.analysis import analyse, score_above_chance


def row(skill: str, reference: str, answer: str, score: float, sample_id: str = "x") -> dict:
    return {"id": sample_id, "skill": skill, "question": "q", "answer": answer, "reference": reference, "score": score}


def test_error_rates_confusions_and_ranking() -> None:
    predictions = [
        row("count", "3", "4", 0.0), row("count", "3", "4", 0.0), row("count", "5", "2", 0.0), row("count", "2", "2", 1.0),
        row("spatial", "left", "right", 0.0), row("spatial", "left", "left", 1.0),
        row("color", "red", "red", 1.0), row("color", "blue", "blue", 1.0),
    ]
    analysis = analyse(predictions, {"count": 1 / 6, "spatial": 0.5, "color": 1 / 9})
    count = analysis.categories["count"]
    assert count.error_rate == pytest.approx(0.75) and count.off_by_one == 2
    assert count.confusions[0] == ("3", "4", 2)
    assert analysis.categories["spatial"].score == pytest.approx(0.0)  # 0.5 on a yes/no-like skill is chance
    assert analysis.weaknesses == ["spatial", "count", "color"]
    assert len(analysis.bad_cases) == 4 and all(case["score"] < 1 for case in analysis.bad_cases)


def test_score_above_chance_is_clipped() -> None:
    assert score_above_chance(0.4, 0.5) == 0.0
    assert score_above_chance(1.0, 0.5) == 1.0
    assert score_above_chance(0.75, 0.5) == pytest.approx(0.5)


def test_caption_hallucination_rate_against_the_scene_graph() -> None:
    cfg = WorldConfig()
    scene = sample_scene(cfg, np.random.default_rng(0), n_objects=3, with_word=False)
    true = caption_text(scene)
    absent = next((c, s) for c in cfg.colors for s in cfg.shapes
                  if not any(o.color == c and o.shape == s for o in scene.shapes))
    wrong = f"{true.rstrip('.')}, a small {absent[0]} {absent[1]} in the center."
    predictions = [row("caption", true, true, 1.0, "a"), row("caption", true, wrong, 0.8, "b")]
    analysis = analyse(predictions, {"caption": 0.0}, scene_of=lambda _id: scene)
    phrases = len(parse_caption(true)) + len(parse_caption(wrong))
    assert analysis.caption_hallucination_rate == pytest.approx(1 / phrases)  # the one invented object
    clean = analyse(predictions[:1], {"caption": 0.0}, scene_of=lambda _id: scene)
    assert clean.caption_hallucination_rate == 0.0
