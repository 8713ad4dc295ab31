"""Behaviour of the built-in world: geometry, scenes, pixels, questions, oracle, labels and the teacher."""

from __future__ import annotations

import io
import itertools
import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
from PIL import Image

from curation.sources.world import (
    BACKGROUND,
    COLOR_RGB,
    COLORS,
    SHAPES,
    SKILLS,
    WORDS,
    Difficulty,
    Layout,
    Scene,
    WorldConfig,
    WorldGenerator,
    WorldObject,
    caption_f1,
    caption_hallucinations,
    caption_text,
    chance_level,
    check_answer,
    label_spaces,
    make_question,
    make_questions,
    patch_labels,
    position_name,
    render_scene,
    sample_scene,
)
from curation.sources.world.layout import MARGIN
from curation.sources.world.render import word_mask


def tiny_config(**overrides) -> WorldConfig:
    """A world small enough to generate in milliseconds."""
    return WorldConfig(**{"train_per_skill": 6, "eval_per_skill": 4, "turns_per_record": 3, "train_scale": {}, **overrides})


def shape(color: str, kind: str, row: int, col: int, size: str = "large") -> WorldObject:
    return WorldObject(kind="shape", shape=kind, color=color, size=size, row=row, col=col)


def word(text: str, row: int, col: int, color: str = "white") -> WorldObject:
    return WorldObject(kind="word", shape=None, color=color, size=None, row=row, col=col, word=text)


# ----------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("image_size,grid", [(64, 3), (48, 3), (50, 4), (37, 2), (100, 7)])
def test_cells_partition_the_pixels_by_pixel_centre(image_size: int, grid: int) -> None:
    layout = Layout(image_size, grid)
    spans = [layout.cell_span(i) for i in range(grid)]
    assert spans[0][0] == 0 and spans[-1][1] == image_size - 1
    assert all(spans[i][1] + 1 == spans[i + 1][0] for i in range(grid - 1)), spans
    for pixel in range(image_size):
        cell = layout.cell_of_pixel(pixel)
        first, last = spans[cell]
        assert first <= pixel <= last
        # The continuous definition: the pixel centre lies in [cell * S / g, (cell + 1) * S / g).
        assert cell * image_size / grid <= pixel + 0.5 < (cell + 1) * image_size / grid


@pytest.mark.parametrize("image_size,grid", [(64, 3), (48, 3), (50, 4), (37, 2)])
@pytest.mark.parametrize("kind,size", [("shape", "small"), ("shape", "large"), ("word", None)])
def test_jittered_objects_keep_the_margin_inside_every_cell(
    image_size: int, grid: int, kind: str, size: str | None
) -> None:
    layout = Layout(image_size, grid)
    jx, jy = layout.max_jitter(kind, size)
    assert jx <= layout.cell_size / 10 and jy <= layout.cell_size / 10
    for row, col, dx, dy in itertools.product(range(grid), range(grid), (-jx, jx), (-jy, jy)):
        x0, y0, x1, y1 = layout.object_box(kind, size, row, col, dx, dy)
        (cx0, cx1), (cy0, cy1) = layout.cell_span(col), layout.cell_span(row)
        assert cx0 + MARGIN <= x0 <= x1 <= cx1 - MARGIN, (row, col, dx, (x0, x1), (cx0, cx1))
        assert cy0 + MARGIN <= y0 <= y1 <= cy1 - MARGIN, (row, col, dy, (y0, y1), (cy0, cy1))


def test_default_sizes_match_the_design() -> None:
    layout = Layout(64, 3)
    cell = 64 / 3
    assert abs(layout.extent("shape", "large")[0] / cell - 0.8) < 0.05
    assert abs(layout.extent("shape", "small")[0] / cell - 0.45) < 0.05
    assert layout.max_jitter("shape", "small") == (2, 2)  # ±cell/10


def test_position_names() -> None:
    assert [position_name(r, c, 3) for r, c in [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0)]] == [
        "top left",
        "top center",
        "center",
        "middle right",
        "bottom left",
    ]
    assert len({position_name(r, c, 3) for r in range(3) for c in range(3)}) == 9
    assert position_name(1, 3, 4) == "row 2, column 4"
    with pytest.raises(ValueError, match="outside"):
        position_name(3, 0, 3)


# ----------------------------------------------------------------------------------------------- scenes


@pytest.mark.parametrize("overrides", [{}, {"grid": 4, "image_size": 80, "max_objects": 12}, {"word_prob": 1.0}])
def test_sampled_scenes_keep_their_invariants(overrides: dict, rng: np.random.Generator) -> None:
    cfg = tiny_config(**overrides)
    layout = Layout(cfg.image_size, cfg.grid)
    words_seen = 0
    for _ in range(300):
        scene = sample_scene(cfg, rng)
        assert cfg.min_objects <= len(scene.shapes) <= cfg.max_objects
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        assert len({(o.color, o.shape) for o in scene.shapes}) == len(scene.shapes)
        for obj in scene.objects:
            jx, jy = layout.max_jitter(obj.kind, obj.size)
            assert abs(obj.dx) <= jx and abs(obj.dy) <= jy
            assert obj.color in cfg.colors
            if obj.kind == "word":
                assert obj.word in cfg.words
            else:
                assert obj.shape in cfg.shapes and obj.size in cfg.sizes
        words_seen += scene.word_object is not None
    # word_prob: binomial(300, p); 0.3 * 300 = 90 ± 8 (sd), so ± 40 cannot fail by chance.
    assert abs(words_seen - 300 * cfg.word_prob) <= 40, words_seen


def test_sample_scene_honours_explicit_arguments(rng: np.random.Generator) -> None:
    cfg = tiny_config()
    for n in range(1, 9):
        scene = sample_scene(cfg, rng, n_objects=n, with_word=True)
        assert len(scene.shapes) == n and scene.word_object is not None
        assert sample_scene(cfg, rng, n_objects=n, with_word=False).word_object is None
    with pytest.raises(ValueError, match="free cell"):
        sample_scene(cfg, rng, n_objects=9, with_word=True)
    with pytest.raises(ValueError, match="n_objects=10"):
        sample_scene(cfg, rng, n_objects=10)


def test_scene_json_round_trip(rng: np.random.Generator) -> None:
    cfg = tiny_config(word_prob=0.5)
    for _ in range(50):
        scene = sample_scene(cfg, rng)
        data = json.loads(json.dumps(scene.to_json()))
        assert Scene.from_json(data) == scene
        assert data["objects"] == [asdict(o) for o in scene.objects]  # hand-written to_json stays in sync
        assert Scene.from_json(data).key() == scene.key()


def test_scene_order_is_canonical_and_invariants_are_checked() -> None:
    a, b = shape("red", "circle", 0, 0), shape("blue", "square", 2, 1)
    assert Scene((a, b), 3, 64) == Scene((b, a), 3, 64)
    with pytest.raises(ValueError, match="two objects in one cell"):
        Scene((a, replace(b, row=0, col=0)), 3, 64)
    with pytest.raises(ValueError, match="repeats a \\(color, shape\\) pair"):
        Scene((a, replace(a, row=1)), 3, 64)
    with pytest.raises(ValueError, match="would leave its cell"):
        Scene((replace(a, dx=5),), 3, 64)
    with pytest.raises(ValueError, match="outside"):
        Scene((replace(a, row=3),), 3, 64)
    with pytest.raises(ValueError, match="word object needs"):
        WorldObject(kind="word", shape="circle", color="red", size=None, row=0, col=0, word="CAT")
    with pytest.raises(ValueError, match="malformed"):
        Scene.from_json({"objects": []})


# ----------------------------------------------------------------------------------------------- pixels


def test_rendering_is_deterministic(rng: np.random.Generator) -> None:
    cfg = tiny_config(word_prob=1.0)
    for _ in range(20):
        scene = sample_scene(cfg, rng)
        first, second = render_scene(scene, cfg), render_scene(Scene.from_json(scene.to_json()), cfg)
        assert first.mode == "RGB" and first.size == (64, 64)
        assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize("overrides", [{}, {"grid": 4, "image_size": 80, "max_objects": 12}])
def test_pixels_agree_with_the_scene_graph(overrides: dict, rng: np.random.Generator) -> None:
    """A cell has non-background pixels iff it holds an object; a shape's pixels are its colour, in its box."""
    cfg = tiny_config(word_prob=0.5, **overrides)
    background = np.array(BACKGROUND)
    for _ in range(40):
        scene = sample_scene(cfg, rng)
        pixels = np.asarray(render_scene(scene, cfg)).astype(int)  # [H, W, 3]
        layout = scene.layout
        for row, col in itertools.product(range(cfg.grid), repeat=2):
            (x0, x1), (y0, y1) = layout.cell_span(col), layout.cell_span(row)
            cell = pixels[y0 : y1 + 1, x0 : x1 + 1]
            drawn = (cell != background).any(axis=-1)  # [cell_h, cell_w]
            obj = scene.object_at(row, col)
            assert drawn.any() == (obj is not None), (row, col, obj)
            if obj is None:
                continue
            bx0, by0, bx1, by1 = layout.object_box(obj.kind, obj.size, row, col, obj.dx, obj.dy)
            ys, xs = np.nonzero(drawn)
            assert bx0 <= xs.min() + x0 and xs.max() + x0 <= bx1 and by0 <= ys.min() + y0 and ys.max() + y0 <= by1
            if obj.kind == "shape":
                assert (cell[drawn] == np.array(COLOR_RGB[obj.color])).all(), "shapes are drawn without antialiasing"
                # A shape fills a good part of its box (a thin outline would be unreadable when small).
                assert drawn.sum() >= 0.3 * (bx1 - bx0 + 1) * (by1 - by0 + 1)


def test_each_cell_maps_to_exactly_one_model_patch(rng: np.random.Generator) -> None:
    """Downstream, 64 px images are resized to 48 px (BOX) and cut into 16 px patches, one per cell."""
    cfg = tiny_config(word_prob=0.5)
    for _ in range(40):
        scene = sample_scene(cfg, rng)
        image = render_scene(scene, cfg)
        for resample in (Image.Resampling.BOX, Image.Resampling.BILINEAR):
            small = np.asarray(image.resize((48, 48), resample)).astype(int)
            for row, col in itertools.product(range(3), repeat=2):
                patch = small[16 * row : 16 * row + 16, 16 * col : 16 * col + 16]
                drawn = (np.abs(patch - np.array(BACKGROUND)) > 0).any()
                assert drawn == (scene.object_at(row, col) is not None), (resample, row, col)


def test_shapes_colours_and_words_are_distinguishable() -> None:
    cfg = tiny_config()
    masks = {}
    for kind in SHAPES:
        for size in ("small", "large"):
            pixels = np.asarray(render_scene(Scene((shape("white", kind, 1, 1, size),), 3, 64), cfg))
            masks[kind, size] = (pixels != np.array(BACKGROUND)).any(axis=-1)
    for size in ("small", "large"):
        for a, b in itertools.combinations(SHAPES, 2):
            differing = (masks[a, size] != masks[b, size]).sum()
            assert differing >= 4, f"{size} {a} and {b} differ in only {differing} pixels"
    for (a, rgb_a), (b, rgb_b) in itertools.combinations([*COLOR_RGB.items(), ("background", BACKGROUND)], 2):
        assert math.dist(rgb_a, rgb_b) >= 100, f"{a} and {b} are too close: {rgb_a} vs {rgb_b}"
    box_w, box_h = Layout(64, 3).extent("word", None)
    glyphs = {w: np.asarray(word_mask(w, box_w, box_h)) for w in WORDS}
    for w, mask in glyphs.items():
        assert mask.shape[1] <= box_w and mask.shape[0] <= box_h and mask.shape[0] >= 0.7 * box_h, (w, mask.shape)
    assert len({m.tobytes() for m in glyphs.values()}) == len(WORDS)


def test_render_rejects_a_scene_from_another_world() -> None:
    with pytest.raises(ValueError, match="render it with the config"):
        render_scene(Scene((shape("red", "circle", 0, 0),), 4, 80), tiny_config())


# ------------------------------------------------------------------------------------ questions, oracle

WRONG = {
    "color": lambda a: next(c for c in COLORS if c != a),
    "shape": lambda a: next(s for s in SHAPES if s != a),
    "count": lambda a: str(int(a) + 1),
    "spatial": lambda a: {"left": "right", "right": "left", "above": "below", "below": "above"}[a],
    "ocr": lambda a: next(w for w in WORDS if w != a),
    "existence": lambda a: {"yes": "no", "no": "yes"}[a],
    "grounding": lambda a: "center" if a != "center" else "top left",
}


@pytest.mark.parametrize("skill", SKILLS)
def test_generated_answers_pass_the_oracle_and_wrong_ones_fail(skill: str, seed: int) -> None:
    cfg = tiny_config()
    records = WorldGenerator(cfg).request(skill, 40, seed=seed, turns=3)
    for record in records:
        texts = [q.text for q in record.questions]
        assert len(set(texts)) == len(texts) and len({q.key for q in record.questions}) == len(texts)
        for question in record.questions:
            json.dumps(question.meta)  # JSON-serialisable
            assert question.skill == skill and "<image>" not in question.text
            assert check_answer(skill, record.scene, question.meta, question.answer) == 1.0, question
            if skill == "caption":
                assert caption_hallucinations(record.scene, question.answer) == []
                missing_last = ", ".join(question.answer.rstrip(".").split(", ")[:-1]) + "."
                assert check_answer(skill, record.scene, question.meta, missing_last) < 1.0
                assert check_answer(skill, record.scene, question.meta, "a cat on a mat.") == 0.0
                continue
            wrong = WRONG[skill](question.answer)
            assert check_answer(skill, record.scene, question.meta, wrong) == 0.0, (question, wrong)
            assert check_answer(skill, record.scene, question.meta, f"  {question.answer.upper()}. ") == 1.0


@pytest.mark.parametrize("skill", ["caption", "count", "ocr"])
def test_single_question_skills_give_one_turn(skill: str, seed: int) -> None:
    records = WorldGenerator(tiny_config()).request(skill, 10, seed=seed, turns=3)
    assert all(len(r.questions) == 1 for r in records)


def test_answers_agree_with_the_pixels(seed: int) -> None:
    """The answers are true of the rendered image, not only of the scene graph they were derived from."""
    cfg = tiny_config()
    generator = WorldGenerator(cfg)
    layout = Layout(64, 3)
    names = {position_name(r, c, 3): (r, c) for r in range(3) for c in range(3)}

    def cell_pixels(image: np.ndarray, row: int, col: int) -> np.ndarray:
        (x0, x1), (y0, y1) = layout.cell_span(col), layout.cell_span(row)
        return image[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3)

    for skill in ("count", "grounding", "color"):
        for record in generator.request(skill, 30, seed=seed, turns=3):
            image = np.asarray(render_scene(record.scene, cfg)).astype(int)
            for question in record.questions:
                if skill == "count":
                    # Cells containing a uniformly coloured (shape) region; the word's antialiased cell is not one.
                    uniform = 0
                    for row, col in itertools.product(range(3), repeat=2):
                        drawn = cell_pixels(image, row, col)
                        drawn = drawn[(drawn != np.array(BACKGROUND)).any(axis=1)]
                        uniform += len(drawn) > 0 and (drawn == drawn[0]).all()
                    assert str(uniform) == question.answer
                elif skill == "grounding":
                    row, col = names[question.answer]
                    target = np.array(COLOR_RGB[question.meta["color"]])
                    assert (cell_pixels(image, row, col) == target).all(axis=1).sum() > 10
                else:
                    target = np.array(COLOR_RGB[question.answer])
                    cells = [o.cell for o in record.scene.shapes if o.shape == question.meta["shape"]]
                    assert len(cells) == 1 and (cell_pixels(image, *cells[0]) == target).all(axis=1).sum() > 10


def test_unsupported_scenes_give_no_question(rng: np.random.Generator) -> None:
    two_circles = Scene((shape("red", "circle", 0, 0), shape("blue", "circle", 1, 1)), 3, 64)
    assert make_question("color", two_circles, rng) is None  # "the circle" would be ambiguous
    assert make_question("ocr", two_circles, rng) is None
    assert make_question("spatial", Scene((shape("red", "circle", 0, 0),), 3, 64), rng) is None
    red_word = Scene((shape("red", "circle", 0, 0), word("CAT", 1, 1, color="red")), 3, 64)
    assert make_question("shape", red_word, rng) is None  # "the red object" could be the word
    with pytest.raises(ValueError, match="unknown"):
        make_question("colour", two_circles, rng)


def test_caption_format_and_scoring() -> None:
    scene = Scene(
        (shape("red", "circle", 0, 0, "small"), shape("blue", "square", 1, 1), word("CAT", 2, 2)), 3, 64
    )
    truth = "small red circle at top left, large blue square at center, the word CAT at bottom right."
    assert caption_text(scene) == truth
    assert check_answer("caption", scene, {}, truth) == 1.0
    assert check_answer("caption", scene, {}, truth.upper().rstrip(".")) == 1.0
    hallucinating = "small red circle at top left, large blue square at center, large green star at top right."
    # 2 of 3 predicted phrases are right, 2 of 3 true phrases found: F1 = 2/3.
    assert caption_f1(scene, hallucinating) == pytest.approx(2 / 3)
    assert caption_hallucinations(scene, hallucinating) == ["large green star at top right"]
    misplaced = "small red circle at bottom left, the word DOG at center, the word cat at bottom right"
    # A misplaced circle is an attribute error, not a hallucination; a wrong word is.
    assert caption_hallucinations(scene, misplaced) == ["the word dog at center"]
    assert check_answer("caption", scene, {}, "") == 0.0


def test_captions_on_other_grids_keep_commas_inside_positions(rng: np.random.Generator) -> None:
    cfg = tiny_config(grid=4, image_size=80, max_objects=10, word_prob=0.5)
    for _ in range(20):
        scene = sample_scene(cfg, rng)
        caption = caption_text(scene)
        assert "column" in caption
        assert check_answer("caption", scene, {}, caption) == 1.0
        first_phrase_only = caption.split(", column")[0]
        assert check_answer("caption", scene, {}, first_phrase_only) < 1.0


def test_existence_negatives_are_absent_adversarial_and_balanced(seed: int) -> None:
    cfg = tiny_config()
    records = WorldGenerator(cfg).request("existence", 300, seed=seed)
    answers = [r.questions[0].answer for r in records]
    # Binomial(300, 0.5): sd 0.029; a ±0.1 band is 3.5 sd.
    assert abs(answers.count("yes") / 300 - 0.5) < 0.1, answers.count("yes")
    negatives = [(r.scene, r.questions[0].meta) for r in records if r.questions[0].answer == "no"]
    for scene, meta in negatives:
        assert (meta["color"], meta["shape"]) not in {(o.color, o.shape) for o in scene.shapes}
        if meta["negative_kind"] == "adversarial":
            assert any(o.color == meta["color"] or o.shape == meta["shape"] for o in scene.shapes)
    adversarial = sum(meta["negative_kind"] == "adversarial" for _, meta in negatives)
    assert adversarial == len(negatives), "the default world always has an absent pair sharing a colour or shape"


def test_existence_stays_balanced_over_many_turns(seed: int) -> None:
    """Multi-turn records alternate yes/no, so scenes with one shape cannot tilt training toward "no"."""
    records = WorldGenerator(tiny_config()).request("existence", 300, Difficulty(1, 2), seed=seed, turns=3)
    answers = [q.answer for r in records for q in r.questions]
    assert abs(answers.count("yes") / len(answers) - 0.5) < 0.07, (answers.count("yes"), len(answers))
    assert all(sum(q.answer == "yes" for q in r.questions) <= r.n_objects for r in records)


def test_spatial_answers_are_balanced_within_each_form(seed: int) -> None:
    records = WorldGenerator(tiny_config()).request("spatial", 400, seed=seed)
    by_axis: dict[str, list[str]] = {"horizontal": [], "vertical": []}
    for record in records:
        question = record.questions[0]
        by_axis[question.meta["axis"]].append(question.answer)
        assert ("left or right" in question.text or "to the right" in question.text) == (
            question.meta["axis"] == "horizontal"
        )
    for axis, first in (("horizontal", "left"), ("vertical", "above")):
        answers = by_axis[axis]
        assert len(answers) > 100
        assert abs(answers.count(first) / len(answers) - 0.5) < 0.12, (axis, answers.count(first), len(answers))


def test_chance_levels() -> None:
    cfg = tiny_config()
    assert chance_level("color", cfg) == pytest.approx(1 / 9)
    assert chance_level("shape", cfg) == pytest.approx(1 / 7)
    assert chance_level("count", cfg) == pytest.approx(1 / 6)
    assert chance_level("spatial", cfg) == chance_level("existence", cfg) == 0.5
    assert chance_level("ocr", cfg) == pytest.approx(1 / 20)
    assert chance_level("grounding", cfg) == pytest.approx(1 / 9)
    assert chance_level("caption", cfg) == 0.0


def test_make_questions_returns_distinct_questions(rng: np.random.Generator) -> None:
    cfg = tiny_config()
    scene = sample_scene(cfg, rng, n_objects=6)
    questions = make_questions("grounding", scene, rng, 6)
    assert len(questions) == 6 and len({q.meta["color"] + q.meta["shape"] for q in questions}) == 6
    assert len(make_questions("grounding", scene, rng, 50)) == 6  # no more than the scene supports


# ----------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("patch_grid", [3, 6])
def test_patch_labels_follow_the_cells(patch_grid: int, rng: np.random.Generator) -> None:
    cfg = tiny_config(word_prob=0.5)
    spaces = label_spaces(cfg)
    assert spaces == {"color": 10, "shape": 9, "size": 3, "word": 21, "row": 3, "col": 3}
    scale = patch_grid // 3
    for _ in range(30):
        scene = sample_scene(cfg, rng)
        labels = patch_labels(scene, cfg, patch_grid)
        for head, values in labels.items():
            assert values.shape == (patch_grid**2,) and values.dtype == np.int64
            assert 0 <= values.min() and values.max() < spaces[head], head
        for patch in range(patch_grid**2):
            row, col = (patch // patch_grid) // scale, (patch % patch_grid) // scale
            assert (labels["row"][patch], labels["col"][patch]) == (row, col)
            obj = scene.object_at(row, col)
            if obj is None:
                assert all(labels[h][patch] == 0 for h in ("color", "shape", "size", "word"))
            elif obj.kind == "word":
                assert labels["shape"][patch] == len(cfg.shapes) + 1 and labels["size"][patch] == 0
                assert cfg.words[labels["word"][patch] - 1] == obj.word
            else:
                assert cfg.shapes[labels["shape"][patch] - 1] == obj.shape
                assert cfg.sizes[labels["size"][patch] - 1] == obj.size and labels["word"][patch] == 0
            if obj is not None:
                assert cfg.colors[labels["color"][patch] - 1] == obj.color


@pytest.mark.parametrize("patch_grid", [0, 2, 4])
def test_patch_labels_reject_patches_straddling_cells(patch_grid: int, rng: np.random.Generator) -> None:
    cfg = tiny_config()
    with pytest.raises(ValueError, match="multiple of the world grid"):
        patch_labels(sample_scene(cfg, rng), cfg, patch_grid)


# ---------------------------------------------------------------------------------------------- teacher


def test_records_depend_only_on_seed_skill_and_index(seed: int) -> None:
    generator = WorldGenerator(tiny_config())
    six = generator.request("grounding", 6, seed=seed, turns=2)
    three = WorldGenerator(tiny_config()).request("grounding", 3, seed=seed, turns=2)
    assert [(r.scene, r.questions) for r in six[:3]] == [(r.scene, r.questions) for r in three]
    other = generator.request("grounding", 6, seed=seed + 1, turns=2)
    assert [r.scene for r in six] != [r.scene for r in other]
    assert [r.id for r in six] == [f"teacher-grounding-{i:06d}" for i in range(6)]


@pytest.mark.parametrize("skill", SKILLS)
@pytest.mark.parametrize("low,high", [(1, 1), (4, 6), (8, 8)])
def test_teacher_honours_difficulty(skill: str, low: int, high: int, seed: int) -> None:
    cfg = tiny_config()
    records = WorldGenerator(cfg).request(skill, 12, Difficulty(low, high), seed=seed)
    expected_low = max(low, 2 if skill == "spatial" else 1)
    expected_high = max(high, expected_low)
    assert all(expected_low <= r.n_objects <= expected_high for r in records), [r.n_objects for r in records]
    if skill == "count":
        assert {r.questions[0].answer for r in records} <= {str(n) for n in range(low, high + 1)}
    if skill == "ocr":
        assert all(r.scene.word_object is not None for r in records)


def test_teacher_rejects_impossible_requests() -> None:
    generator = WorldGenerator(tiny_config())
    with pytest.raises(ValueError, match="ocr at 9..9 objects"):
        generator.request("ocr", 1, Difficulty(9, 9))
    with pytest.raises(ValueError, match="min_objects"):
        Difficulty(3, 2)
    with pytest.raises(ValueError, match="unknown skill"):
        generator.request("counting", 1)
    narrow = WorldGenerator(tiny_config(colors=["red", "blue"], shapes=["circle", "square"], max_objects=3))
    with pytest.raises(ValueError, match="existence at 4..4 objects"):
        narrow.request("existence", 1, Difficulty(4, 4))


def test_splits_are_disjoint_and_shaped_as_configured() -> None:
    cfg = tiny_config(skills=["count", "spatial", "ocr"], train_per_skill=40, eval_per_skill=20)
    generator = WorldGenerator(cfg)
    train, evaluation = generator.split("train"), generator.split("eval")
    assert len(train) == 3 * 40 and len(evaluation) == 3 * 20
    assert train[0].id == "train-count-000000" and evaluation[-1].id == "eval-ocr-000019"
    assert all(r.split == "eval" and len(r.questions) == 1 for r in evaluation)
    assert all(1 <= len(r.questions) <= 3 for r in train) and any(len(r.questions) == 3 for r in train)
    assert not {r.scene.key() for r in train} & {r.scene.key() for r in evaluation}
    with pytest.raises(ValueError, match="split 'test'"):
        generator.split("test")


def test_eval_redraws_scenes_that_occur_in_train() -> None:
    # One shape on a 2x2 grid of 8 px cells (no room for jitter): only 32 distinct scenes, so 60 training
    # scenes and 20 held-out ones collide unless the held-out ones are redrawn.
    cfg = tiny_config(
        grid=2, image_size=16, colors=["red", "blue"], shapes=["circle", "square"], sizes=["large", "small"],
        min_objects=1, max_objects=1, word_prob=0.0, skills=["count"], train_per_skill=60, eval_per_skill=20,
    )
    generator = WorldGenerator(cfg)
    train_keys = {r.scene.key() for r in generator.split("train")}
    plain = generator.request("count", 20, seed=cfg.eval_seed, split="eval")
    assert {r.scene.key() for r in plain} & train_keys, "the test needs a world where collisions happen"
    assert not {r.scene.key() for r in generator.split("eval")} & train_keys


def test_train_counts_override_the_per_skill_count() -> None:
    cfg = tiny_config(skills=["count", "ocr"], train_per_skill=5, train_counts={"ocr": 9}, eval_per_skill=2)
    train = WorldGenerator(cfg).split("train")
    assert [r.skill for r in train].count("count") == 5 and [r.skill for r in train].count("ocr") == 9
    with pytest.raises(ValueError, match="train_counts: unknown skill"):
        tiny_config(train_counts={"colour": 3})
    with pytest.raises(ValueError, match="counts must be >= 0"):
        tiny_config(train_counts={"ocr": -1})
    with pytest.raises(ValueError, match="image_position"):
        tiny_config(image_position="middle")


def test_train_scale_keeps_proportions_and_counts_win() -> None:
    cfg = tiny_config(skills=["count", "ocr", "color"], train_per_skill=10, train_scale={"count": 0.5, "ocr": 0.25},
                      train_counts={"ocr": 7}, eval_per_skill=2)
    skills = [r.skill for r in WorldGenerator(cfg).split("train")]
    assert (skills.count("count"), skills.count("ocr"), skills.count("color")) == (5, 7, 10)
    assert WorldConfig().train_count("ocr") == WorldConfig().train_per_skill // 2
    with pytest.raises(ValueError, match="train_scale: unknown skill"):
        tiny_config(train_scale={"colour": 0.5})
    with pytest.raises(ValueError, match="finite and >= 0"):
        tiny_config(train_scale={"ocr": -0.5})


def test_config_rejects_too_few_pairs() -> None:
    with pytest.raises(ValueError, match="colors x shapes gives 4"):
        WorldConfig(colors=["red", "blue"], shapes=["circle", "square"], max_objects=4)


def test_png_encoding_is_deterministic(rng: np.random.Generator) -> None:
    cfg = tiny_config(word_prob=1.0)
    scene = sample_scene(cfg, rng)
    encoded = []
    for _ in range(2):
        buffer = io.BytesIO()
        render_scene(scene, cfg).save(buffer, format="PNG", compress_level=1)
        encoded.append(buffer.getvalue())
    assert encoded[0] == encoded[1]


@pytest.mark.parametrize("noise", [0.1, 0.5])
def test_caption_noise_swaps_the_captions_of_a_share_of_train_caption_records(noise: float) -> None:
    base = dict(skills=["caption", "color"], train_per_skill=200, eval_per_skill=20)
    clean = WorldGenerator(WorldConfig(**base))
    noisy = WorldGenerator(WorldConfig(**base, caption_noise=noise))
    before, after = clean.split("train"), noisy.split("train")
    assert [r.scene for r in before] == [r.scene for r in after] and [r.id for r in before] == [r.id for r in after]
    changed = [(b, a) for b, a in zip(before, after) if b.questions != a.questions]
    assert len(changed) == round(noise * 200) and all(a.skill == "caption" and a.caption_from for _, a in changed)
    donors = {r.id: r for r in before}
    for _, a in changed:
        assert a.questions[0].answer == donors[a.caption_from].questions[0].answer  # another scene's true caption
        assert caption_f1(a.scene, a.questions[0].answer) < 1.0  # ... which does not describe this one
    # No caption text is lost: the noisy records pass their captions round a cycle.
    assert sorted(a.questions[0].answer for _, a in changed) == sorted(b.questions[0].answer for b, _ in changed)
    assert noisy.split("eval") == clean.split("eval")  # held-out records are never noisy
    assert [r.questions for r in WorldGenerator(WorldConfig(**base, caption_noise=noise)).split("train")] == \
        [r.questions for r in after]  # deterministic


@pytest.mark.parametrize("noise", [-0.1, 1.0])
def test_caption_noise_outside_0_1_is_rejected(noise: float) -> None:
    with pytest.raises(ValueError, match="caption_noise"):
        WorldConfig(caption_noise=noise)
