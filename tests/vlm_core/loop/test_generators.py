"""Generators produce what was requested: the skills and counts of the plan, verified against the scene graph."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from curation.sources.world import WorldConfig, caption_f1, caption_text, check_answer
from curation.sources.world.generator import WorldGenerator
from vlm_core.loop.config import SelfAugmentConfig, SpecialistConfig, TeacherConfig
from vlm_core.loop.generators import SelfAugment, SpecialistAugment, WorldTeacher, caption_window, verify_caption
from vlm_core.loop.rounds import _divide_plan
from vlm_core.types import Turn

WORLD = WorldConfig(train_per_skill=4, eval_per_skill=3)


def test_teacher_produces_the_plan(tmp_path: Path) -> None:
    eval_keys = frozenset(r.scene.key() for r in WorldGenerator(WORLD).request("spatial", 50, seed=WORLD.eval_seed))
    teacher = WorldTeacher(WORLD, TeacherConfig(), tmp_path / "images", eval_keys)
    plan = {"spatial": 7, "count": 3, "ocr": 0, "color": 1}
    out = teacher.generate(plan, seed=50_001, split="r1", source="r1_teacher", scores={"spatial": 0.0, "count": 0.9})
    assert out.requested == plan
    assert out.produced() == {"spatial": 7, "count": 3, "color": 1}
    assert len({s.id for s in out.samples}) == len(out.samples)
    for sample in out.samples:
        path = sample.image_paths[0]
        scene = out.scenes[str(path)]
        assert path.is_file() and sample.source == "r1_teacher"
        assert scene.key() not in eval_keys
        # The oracle accepts every answer the teacher wrote.
        question_meta = sample.meta["questions"][0]
        assert check_answer(sample.skill, scene, question_meta, sample.turns[-1].text) == 1.0
        assert sample.turns[0].text.endswith("<image>")  # the world's default image_position=last
        if sample.skill == "spatial":  # weak (score 0): scenes from the upper half of 1..6 objects
            assert len(scene.shapes) >= 4
    assert min(len(out.scenes[str(s.image_paths[0])].shapes) for s in out.samples if s.skill == "count") >= 1


def test_teacher_is_deterministic_and_new_per_round(tmp_path: Path) -> None:
    teacher = WorldTeacher(WORLD, TeacherConfig(), tmp_path, frozenset())
    a = teacher.generate({"color": 4}, seed=1, split="r1", source="s")
    b = teacher.generate({"color": 4}, seed=1, split="r1", source="s")
    c = teacher.generate({"color": 4}, seed=2, split="r2", source="s")
    assert [s.turns for s in a.samples] == [s.turns for s in b.samples]
    assert [s.turns for s in a.samples] != [s.turns for s in c.samples]


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_plan_divides_exactly_between_generators(parts: int) -> None:
    plan = {"spatial": 11, "color": 1, "count": 0}
    shares = _divide_plan(plan, parts)
    assert len(shares) == parts
    assert {k: sum(s[k] for s in shares) for k in plan} == plan


def test_self_augment_keeps_only_verified_captions(tmp_path: Path) -> None:
    teacher = WorldTeacher(WORLD, TeacherConfig(), tmp_path, frozenset())
    pool = teacher.generate({"caption": 6}, seed=3, split="train", source="world")
    scene_of = {str(s.image_paths[0]): pool.scenes[str(s.image_paths[0])] for s in pool.samples}

    def faithful(samples):  # answers in another phrase order, nothing invented
        return [", ".join(reversed(caption_text(scene_of[str(s.image_paths[0])]).rstrip(".").split(", "))) + "."
                for s in samples]

    def hallucinating(samples):
        return [caption_text(scene_of[str(s.image_paths[0])]).rstrip(".") + ", a large pink star at top left."
                for s in samples]

    cfg = SelfAugmentConfig(images=5)
    kept = SelfAugment(cfg, faithful).generate(pool.samples, lambda s: scene_of[str(s.image_paths[0])], "r1_sa", 1)
    assert kept.requested == {"caption": 5} and kept.produced() == {"caption": 5}
    assert all(s.meta["recaptioned_from"] and s.skill == "caption" for s in kept.samples)
    assert all("replaces" not in s.meta for s in kept.samples)  # the pool's captions are exact already
    dropped = SelfAugment(cfg, hallucinating).generate(pool.samples, lambda s: scene_of[str(s.image_paths[0])], "x", 1)
    # A pink star at top left is only accepted if the scene has one; the verifier rejects the rest.
    for sample in dropped.samples:
        assert verify_caption(scene_of[str(sample.image_paths[0])], sample.turns[-1].text, cfg)
    assert dropped.rejected["caption"] + len(dropped.samples) == 5 and dropped.rejected["caption"] >= 3


@pytest.mark.parametrize("replace_if_better", [True, False])
def test_self_augment_replaces_noisy_pool_captions_with_better_faithful_ones(tmp_path: Path,
                                                                              replace_if_better: bool) -> None:
    teacher = WorldTeacher(WORLD, TeacherConfig(), tmp_path, frozenset())
    generated = teacher.generate({"caption": 6}, seed=5, split="train", source="world")
    pool = generated.samples

    def scene(sample):
        return generated.scenes[str(sample.image_paths[0])]

    # Web-caption noise: every pool caption describes the next image's scene.
    noisy = [replace(s, turns=(*s.turns[:-1], Turn("assistant", caption_text(scene(pool[(i + 1) % 6])))))
             for i, s in enumerate(pool)]

    def first_phrase_only(samples):  # faithful but incomplete: names one object of the scene
        return [caption_text(scene(s)).split(", ")[0].rstrip(".") + "." for s in samples]

    cfg = SelfAugmentConfig(images=6, min_f1=0.8, replace_if_better=replace_if_better)
    out = SelfAugment(cfg, first_phrase_only).generate(noisy, scene, "r1_sa", 1)
    improvable = [s for s in noisy if caption_f1(scene(s), first_phrase_only([s])[0])
                  > caption_f1(scene(s), s.turns[-1].text)]
    assert improvable, "the fixture needs noisy captions a one-phrase caption beats"
    if replace_if_better:  # each better faithful caption replaces its noisy one, below min_f1 too
        assert sorted(s.meta["replaces"] for s in out.samples) == sorted(s.id for s in improvable)
    else:  # only captions that pass min_f1 may replace; one phrase of a multi-object scene does not
        assert all(caption_f1(scene(s), s.turns[-1].text) >= 0.8 for s in out.samples)
        assert len(out.samples) < len(improvable) or all(len(scene(s).shapes) == 1 for s in improvable)
    assert out.rejected.get("caption", 0) + len(out.samples) == 6


def test_self_augment_walks_the_pool_round_after_round(tmp_path: Path) -> None:
    teacher = WorldTeacher(WORLD, TeacherConfig(), tmp_path, frozenset())
    pool = teacher.generate({"caption": 5, "color": 2}, seed=7, split="train", source="world").samples
    captions = [s.id for s in pool if s.skill == "caption"]
    windows = [[s.id for s in caption_window(pool, 2, k)] for k in (1, 2, 3, 4)]
    assert windows == [captions[0:2], captions[2:4], [captions[4], captions[0]], captions[1:3]]
    assert [s.id for s in caption_window(pool, 9, 3)] == captions  # more than the pool has: all of them
    assert caption_window(pool, 0, 1) == [] and caption_window([s for s in pool if s.skill == "color"], 3, 1) == []
    seen: list[str] = []
    out = SelfAugment(SelfAugmentConfig(images=2), lambda samples: seen.extend(s.id for s in samples) or [""] * len(samples))
    out.generate(pool, lambda s: None, "r2_sa", 2)
    assert seen == captions[2:4]


@pytest.mark.parametrize("field, value", [("images", -1), ("min_f1", 1.5), ("max_hallucinations", -1), ("batch_size", 0)])
def test_self_augment_config_rejects_bad_values(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"self_augment.{field}"):
        SelfAugmentConfig(**{field: value})


def specialist_pool(tmp_path: Path):
    """A pool of every skill but OCR's, written by the teacher; (samples, scene of a sample)."""
    teacher = WorldTeacher(WORLD, TeacherConfig(), tmp_path, frozenset())
    pool = teacher.generate({"caption": 8, "color": 8, "count": 8, "spatial": 4}, seed=11, split="train", source="world")
    return pool.samples, lambda sample: pool.scenes.get(str(sample.image_paths[0]))


def oracle_answers(samples):
    """What the world's oracle wrote as the answer (a perfect specialist)."""
    return [sample.turns[-1].text for sample in samples]


def test_specialist_labels_pool_images_of_other_skills_with_its_skill(tmp_path: Path) -> None:
    pool, scene_of = specialist_pool(tmp_path)
    trained: list[str] = []

    def answer_for(skill):
        trained.append(skill)
        return oracle_answers

    augment = SpecialistAugment(SpecialistConfig(share=0.5), WORLD, answer_for)
    requests = augment.requests({"spatial": 9, "grounding": 4, "ocr": 0, "color": 10})
    assert requests == {"spatial": 5, "grounding": 2}  # half of the specialist skills' counts, rounded half up
    out = augment.generate(pool, scene_of, requests, seed=3, source="r1_specialist", round_index=1)
    assert sorted(trained) == ["grounding", "spatial"]  # a specialist per skill asked for, and only those
    assert out.produced() == requests and out.requested == requests and not out.rejected
    assert out.oracle_agreement == {"grounding": 1.0, "spatial": 1.0}
    by_id = {s.id: s for s in pool}
    for sample in out.samples:
        source = by_id[sample.meta["labelled_from"]]
        assert source.skill != sample.skill and sample.image_paths == source.image_paths  # a pool image, new skill
        scene = scene_of(source)
        assert out.scenes[str(sample.image_paths[0])] == scene and sample.source == "r1_specialist"
        assert check_answer(sample.skill, scene, sample.meta["questions"][0], sample.turns[-1].text) == 1.0
    assert len({s.id for s in out.samples}) == len(out.samples)
    again = augment.generate(pool, scene_of, requests, seed=3, source="r1_specialist", round_index=1)
    later = augment.generate(pool, scene_of, requests, seed=3, source="r2_specialist", round_index=2)
    assert [s.turns for s in again.samples] == [s.turns for s in out.samples]  # deterministic
    assert {s.meta["labelled_from"] for s in later.samples} != {s.meta["labelled_from"] for s in out.samples}


def test_specialist_asks_no_more_images_than_support_its_skill(tmp_path: Path) -> None:
    pool, scene_of = specialist_pool(tmp_path)
    ocr_images = sum(1 for s in pool if scene_of(s).word_object is not None)  # OCR needs a word in the scene
    augment = SpecialistAugment(SpecialistConfig(), WORLD, lambda skill: oracle_answers)
    out = augment.generate(pool, scene_of, {"ocr": len(pool)}, seed=0, source="r1_specialist", round_index=1)
    assert out.produced().get("ocr", 0) == ocr_images < len(pool)


@pytest.mark.parametrize("verify", [True, False])
def test_specialist_labels_are_scored_by_the_oracle_and_verified_on_request(tmp_path: Path, verify: bool) -> None:
    pool, scene_of = specialist_pool(tmp_path)

    def wrong_every_other(samples):
        return [answer if i % 2 == 0 else "purple" for i, answer in enumerate(oracle_answers(samples))]

    augment = SpecialistAugment(SpecialistConfig(verify=verify), WORLD, lambda skill: wrong_every_other)
    out = augment.generate(pool, scene_of, {"spatial": 8}, seed=1, source="r1_specialist", round_index=1)
    assert out.oracle_agreement == {"spatial": 0.5}
    scores = [s.meta["oracle_score"] for s in out.samples]
    if verify:  # the wrong half is dropped and counted
        assert len(out.samples) == 4 and out.rejected == {"spatial": 4} and scores == [1.0] * 4
    else:  # kept as labelled (VILA² on real data), each with the score the oracle gave it
        assert len(out.samples) == 8 and not out.rejected and sorted(scores) == [0.0] * 4 + [1.0] * 4


@pytest.mark.parametrize("field, value", [("skills", ["juggling"]), ("share", 1.5), ("steps", 0), ("batch_size", 0)])
def test_specialist_config_rejects_bad_values(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"specialist.*{field}"):
        SpecialistConfig(**{field: value})
