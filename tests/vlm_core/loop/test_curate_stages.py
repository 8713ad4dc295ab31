"""A round's near dedup and concept balancing (vlm_core.loop.curate_stages) on real rendered teacher samples."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from curation.config import NearConfig
from curation.sources.world import WorldConfig
from curation.stages.near import lsh_index
from vlm_core.loop.config import RoundBalanceConfig, RoundCurationConfig, TeacherConfig
from vlm_core.loop.curate_stages import (
    NearFeatures,
    balance_filter,
    cached_near_features,
    near_features,
    near_filter,
)
from vlm_core.loop.generators import WorldTeacher
from vlm_core.types import Sample, Turn

NEAR = NearConfig()


def _teacher(tmp_path: Path, name: str, plan: dict[str, int], seed: int):
    return WorldTeacher(WorldConfig(), TeacherConfig(), tmp_path / name, frozenset()).generate(plan, seed, name, name)


def _reask(sample: Sample, question: str, new_id: str) -> Sample:
    """The same image asked again with another wording of the question: a near (not exact) duplicate."""
    return dataclasses.replace(sample, id=new_id, turns=(Turn("user", question), *sample.turns[1:]))


def test_near_filter_drops_reasked_pool_images_and_in_round_copies_only(tmp_path: Path) -> None:
    pool = _teacher(tmp_path, "pool", {"color": 12, "count": 12}, seed=1).samples
    pool.append(_reask(pool[0], pool[0].turns[0].text.replace("?", " now?"), "pool-copy"))  # the pool's own duplicates stay
    fresh = _teacher(tmp_path, "fresh", {"color": 10, "count": 10}, seed=2).samples
    reasked = [_reask(s, s.turns[0].text.replace("?", ", please?"), f"re-{s.id}") for s in pool[:5]]
    inside = [_reask(fresh[0], fresh[0].turns[0].text.replace("?", " here?"), "copy-of-fresh-0")]
    increment = fresh + reasked + inside

    reference = cached_near_features(pool, NEAR, tmp_path / "cache", "pool")
    assert len(list((tmp_path / "cache").glob("near-pool-*.npz"))) == 1
    again = cached_near_features(pool, NEAR, tmp_path / "cache", "pool")  # read back from the cache
    assert again.ids == reference.ids and np.array_equal(again.signatures, reference.signatures)

    keep, removed = near_filter(near_features(increment, NEAR), reference, NEAR)
    assert keep.tolist() == [True] * len(fresh) + [False] * len(reasked) + [False]
    assert removed == Counter({"near duplicate of pool or earlier round": 5, "near duplicate within the round": 1})


def test_a_reused_index_decides_as_a_rebuilt_one(tmp_path: Path) -> None:
    """The loop indexes the reference once per round and tests several passes against it; the decisions must be
    those of a reference rebuilt before each pass from the rows kept so far."""
    pool = _teacher(tmp_path, "pool", {"color": 10, "count": 10}, seed=1).samples
    fresh = _teacher(tmp_path, "p1", {"color": 8}, seed=2).samples
    first = [_reask(pool[1], pool[1].turns[0].text.replace("?", " now?"), "p1-pool-copy")]  # row 0: removed
    first += fresh + [_reask(fresh[0], fresh[0].turns[0].text.replace("?", " here?"), "p1-copy")]  # last: removed
    second = [_reask(s, s.turns[0].text.replace("?", ", please?"), f"p2-{s.id}") for s in fresh[2:5]]
    second += _teacher(tmp_path, "p2", {"count": 4}, seed=3).samples  # three re-asks of pass-1 rows, four new

    reference = near_features(pool, NEAR)
    rebuilt_reference, decisions_rebuilt = reference, []
    index, reused_reference, decisions_reused = lsh_index(reference.signatures, NEAR), reference, []
    for batch in (first, second):
        features = near_features(batch, NEAR)
        keep, removed = near_filter(features, rebuilt_reference, NEAR)
        decisions_rebuilt.append((keep.tolist(), removed))
        rebuilt_reference = NearFeatures.concat([rebuilt_reference, features.take(np.flatnonzero(keep))])
        keep, removed = near_filter(features, reused_reference, NEAR, index)
        decisions_reused.append((keep.tolist(), removed))
        reused_reference = NearFeatures.concat([reused_reference, features])  # as the loop grows it
    assert decisions_reused == decisions_rebuilt
    assert decisions_rebuilt[0] == ([False] + [True] * 8 + [False], Counter(
        {"near duplicate within the round": 1, "near duplicate of pool or earlier round": 1}))
    assert decisions_rebuilt[1][0] == [False] * 3 + [True] * 4


def test_near_filter_with_an_empty_reference_keeps_distinct_samples(tmp_path: Path) -> None:
    batch = _teacher(tmp_path, "b", {"spatial": 15, "ocr": 15}, seed=3).samples
    keep, removed = near_filter(near_features(batch, NEAR), NearFeatures.empty(NEAR.num_perm), NEAR)
    assert keep.all() and not removed


def test_near_features_name_an_unreadable_image(tmp_path: Path) -> None:
    sample = _teacher(tmp_path, "b", {"color": 1}, seed=4).samples[0]
    sample.image_paths[0].write_bytes(b"not a png")
    with pytest.raises(RuntimeError, match=f"cannot read .*{sample.image_paths[0].name} \\(sample {sample.id}\\)"):
        near_features([sample], NEAR)


def _sample(i: int, skill: str, answer: str) -> Sample:
    return Sample(id=f"s{i}", source="t", image_paths=(), turns=(Turn("user", "What colour is the shape?"),
                                                                 Turn("assistant", answer)), skill=skill)


def test_balance_caps_a_skewed_concept_within_its_skill_and_family_only() -> None:
    colors = ["green", "blue", "yellow", "purple", "orange", "white", "cyan", "pink"]
    skewed = [_sample(i, "color", "red") for i in range(240)] + [
        _sample(1000 + i, "color", colors[i % 8]) for i in range(240)]  # red at 8x every other colour (30 each)
    even = [_sample(2000 + i, "count", ["red", "blue"][i % 2]) for i in range(40)]  # below min_t: never thinned
    samples = skewed + even
    cfg = RoundBalanceConfig()
    keep, removed = balance_filter(samples, cfg, seed=[0, 0, 1])
    kept = Counter(s.turns[1].text for s, k in zip(samples, keep) if k and s.skill == "color")
    t = cfg.cap * 30  # the median colour count of the color skill is 30, so t = 60
    assert all(kept[c] == 30 for c in colors)  # the even colours keep everything
    assert 0.5 * t < kept["red"] < 1.5 * t  # red keeps about t of its 240
    assert keep[len(skewed):].all()
    assert removed == Counter({"balanced: color over-represents a color": 240 - kept["red"]})
    again, _ = balance_filter(samples, cfg, seed=[0, 0, 1])
    other, _ = balance_filter(samples, cfg, seed=[0, 0, 2])
    assert np.array_equal(keep, again) and not np.array_equal(keep, other)  # seeded, and per round


def test_balance_leaves_an_even_increment_alone(tmp_path: Path) -> None:
    batch = _teacher(tmp_path, "b", {"color": 200, "shape": 200}, seed=5).samples
    keep, removed = balance_filter(batch, RoundBalanceConfig(), seed=[0, 0, 1])
    assert keep.all() and not removed


@pytest.mark.parametrize(("build", "message"), [
    (lambda: RoundCurationConfig(refill=-1), "curation.refill=-1"),
    (lambda: RoundBalanceConfig(cap=0.5), "curation.balance.cap=0.5"),
    (lambda: RoundBalanceConfig(min_t=-1.0), "curation.balance.min_t=-1.0"),
])
def test_round_curation_config_rejects_bad_values(build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build()
