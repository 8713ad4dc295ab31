"""Questions about a scene, one skill at a time, with short closed-vocabulary answers.

Every skill first lists the distinct questions a scene supports (its *candidates*: oracle fields plus
answer), then draws from them and words each one with a random paraphrase template. Answers come from a
small closed vocabulary (colour, shape and position names, digits, yes/no, left/right, above/below, the
rendered word, or a caption in a fixed phrase format), so exact match after normalisation is a
meaningful score; :mod:`curation.sources.world.oracle` re-derives each answer from the scene graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from curation.sources.world.config import COLORS, SHAPES, SKILLS, WorldConfig
from curation.sources.world.layout import position_name
from curation.sources.world.scene import Scene, WorldObject

# Paraphrases per question form. The answer vocabulary is the same for every paraphrase of a form.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": (
        "Describe the image.",
        "What objects are in the image, and where are they?",
        "List every object in the image with its position.",
    ),
    "color": ("What color is the {shape}?", "Which color does the {shape} have?", "What is the color of the {shape}?"),
    "shape": (
        "What shape is the {color} object?",
        "Which shape is {color}?",
        "What is the shape of the {color} object?",
    ),
    "count": ("How many shapes are there?", "How many shapes are in the image?", "Count the shapes in the image."),
    "spatial_horizontal": (
        "Is the {a} left or right of the {b}?",
        "Is the {a} to the left or to the right of the {b}?",
    ),
    "spatial_vertical": ("Is the {a} above or below the {b}?", "Relative to the {b}, is the {a} above or below it?"),
    "ocr": (
        "What word is written in the image?",
        "What does the text in the image say?",
        "Read the word shown in the image.",
    ),
    "existence": (
        "Is there {article} {color} {shape} in the image?",
        "Does the image contain {article} {color} {shape}?",
        "Can you see {article} {color} {shape} in the image?",
    ),
    "grounding": (
        "Where is the {color} {shape}?",
        "In which part of the image is the {color} {shape}?",
        "Where in the image is the {color} {shape} located?",
    ),
}


@dataclass(frozen=True)
class Question:
    """One question about one scene, and its answer.

    ``text`` excludes the ``<image>`` placeholder. ``meta`` holds the oracle fields (JSON-serialisable)
    that, with the scene, determine the answer: e.g. ``{"shape": "circle"}`` for "What color is the circle?".
    """

    skill: str
    text: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> str:
        """What the question asks, independent of its wording: two paraphrases share a key."""
        return json.dumps({"skill": self.skill, "meta": self.meta}, sort_keys=True)


class _Candidate(NamedTuple):
    form: str  # key into TEMPLATES
    meta: dict[str, Any]
    answer: str


def caption_phrases(scene: Scene) -> list[str]:
    """One phrase per object in row-major cell order: "small red circle at top left", "the word CAT at center"."""
    phrases = []
    for obj in scene.objects:
        where = position_name(obj.row, obj.col, scene.grid)
        if obj.kind == "word":
            phrases.append(f"the word {obj.word} at {where}")
        else:
            phrases.append(f"{obj.size} {obj.color} {obj.shape} at {where}")
    return phrases


def caption_text(scene: Scene) -> str:
    """The reference caption: the phrases joined by ", " and ending with "."."""
    return ", ".join(caption_phrases(scene)) + "."


def _name(obj: WorldObject) -> str:
    return f"{obj.color} {obj.shape}"


def _caption(scene: Scene) -> list[_Candidate]:
    return [_Candidate("caption", {}, caption_text(scene))] if scene.objects else []


def _color(scene: Scene) -> list[_Candidate]:
    shape_names = [o.shape for o in scene.shapes]
    # "the circle" must name one object, so only shapes that occur once can be asked about.
    return [
        _Candidate("color", {"shape": o.shape}, o.color) for o in scene.shapes if shape_names.count(o.shape) == 1
    ]


def _shape(scene: Scene) -> list[_Candidate]:
    # Colours are compared over all objects: with a red word on screen, "the red object" would be ambiguous.
    colors = [o.color for o in scene.objects]
    return [
        _Candidate("shape", {"color": o.color}, str(o.shape)) for o in scene.shapes if colors.count(o.color) == 1
    ]


def _count(scene: Scene) -> list[_Candidate]:
    return [_Candidate("count", {}, str(len(scene.shapes)))]


def _spatial(scene: Scene) -> list[_Candidate]:
    # Ordered pairs: (a, b) and (b, a) are both candidates with opposite answers, so drawing uniformly
    # from this list gives left/right (and above/below) 50/50 in expectation, by symmetry.
    candidates = []
    for a in scene.shapes:
        for b in scene.shapes:
            if a is b:
                continue
            pair = {"a_color": a.color, "a_shape": a.shape, "b_color": b.color, "b_shape": b.shape}
            if a.col != b.col:
                answer = "left" if a.col < b.col else "right"
                candidates.append(_Candidate("spatial_horizontal", {**pair, "axis": "horizontal"}, answer))
            if a.row != b.row:
                answer = "above" if a.row < b.row else "below"
                candidates.append(_Candidate("spatial_vertical", {**pair, "axis": "vertical"}, answer))
    return candidates


def _ocr(scene: Scene) -> list[_Candidate]:
    word = scene.word_object
    return [_Candidate("ocr", {}, str(word.word))] if word is not None else []


def _grounding(scene: Scene) -> list[_Candidate]:
    return [
        _Candidate("grounding", {"color": o.color, "shape": o.shape}, position_name(o.row, o.col, scene.grid))
        for o in scene.shapes
    ]


_CANDIDATES = {
    "caption": _caption,
    "color": _color,
    "shape": _shape,
    "count": _count,
    "spatial": _spatial,
    "ocr": _ocr,
    "grounding": _grounding,
}


def _existence(scene: Scene, rng: np.random.Generator, k: int, cfg: WorldConfig | None) -> list[_Candidate]:
    """Up to ``k`` distinct yes/no questions, alternating answers from a random first one (POPE-style).

    Negatives are adversarial: absent (colour, shape) pairs sharing the colour or the shape of a present
    object, so that "no" cannot be answered from colour or shape alone; a random absent pair is used only
    when no adversarial one is left. Alternating answers keeps yes/no 50/50 in expectation for any ``k``,
    and ``k`` is capped at twice the smaller side so a scene with one shape gives one "yes", never two.
    """
    colors = cfg.colors if cfg is not None else list(COLORS)
    shapes = cfg.shapes if cfg is not None else list(SHAPES)
    present = [(o.color, o.shape) for o in scene.shapes]
    absent = [(c, s) for c in colors for s in shapes if (c, s) not in present]
    if not present or not absent:
        return []  # one side of the 50/50 is impossible in this scene
    present_colors = {c for c, _ in present}
    present_shapes = {s for _, s in present}
    adversarial = [p for p in absent if p[0] in present_colors or p[1] in present_shapes]
    random_only = [p for p in absent if p not in adversarial]
    positives = [present[i] for i in rng.permutation(len(present))]
    negatives = [adversarial[i] for i in rng.permutation(len(adversarial))]
    negatives += [random_only[i] for i in rng.permutation(len(random_only))]
    n_adversarial = len(adversarial)
    k = min(k, 2 * len(positives), 2 * len(negatives))
    first_yes = bool(rng.random() < 0.5)
    chosen: list[_Candidate] = []
    used_yes = used_no = 0
    for turn in range(k):
        if (turn % 2 == 0) == first_yes:
            color, shape = positives[used_yes]
            chosen.append(_Candidate("existence", {"color": color, "shape": shape}, "yes"))
            used_yes += 1
        else:
            color, shape = negatives[used_no]
            kind = "adversarial" if used_no < n_adversarial else "random"
            chosen.append(_Candidate("existence", {"color": color, "shape": shape, "negative_kind": kind}, "no"))
            used_no += 1
    return chosen


def _word(candidate: _Candidate, skill: str, rng: np.random.Generator) -> Question:
    templates = TEMPLATES[candidate.form]
    template = templates[int(rng.integers(len(templates)))]
    meta = candidate.meta
    if skill == "spatial":
        text = template.format(a=f"{meta['a_color']} {meta['a_shape']}", b=f"{meta['b_color']} {meta['b_shape']}")
    else:
        article = "an" if str(meta.get("color", ""))[:1] in "aeiou" else "a"  # "an orange hexagon"
        text = template.format(article=article, **meta)
    return Question(skill=skill, text=text, answer=candidate.answer, meta=dict(meta))


def make_questions(
    skill: str, scene: Scene, rng: np.random.Generator, k: int, cfg: WorldConfig | None = None
) -> list[Question]:
    """Up to ``k`` distinct questions of ``skill`` about ``scene`` (distinct in what they ask, not just wording).

    Returns an empty list when the scene cannot support the skill (no shape occurring once for
    ``color``, fewer than two shapes for ``spatial``, no word for ``ocr``...). Skills with a single
    possible question (caption, count, ocr) return one. ``cfg`` supplies the colour and shape vocabulary
    that existence negatives are drawn from; None means every drawable colour and shape.
    """
    if skill not in SKILLS:
        raise ValueError(f"skill {skill!r} is unknown; expected one of {list(SKILLS)}")
    if k < 1:
        raise ValueError(f"k={k}: ask for at least one question")
    if skill == "existence":
        chosen = _existence(scene, rng, k, cfg)
    else:
        candidates = _CANDIDATES[skill](scene)
        chosen = [candidates[i] for i in rng.permutation(len(candidates))[:k]]
    return [_word(candidate, skill, rng) for candidate in chosen]


def make_question(
    skill: str, scene: Scene, rng: np.random.Generator, cfg: WorldConfig | None = None
) -> Question | None:
    """One random question of ``skill`` about ``scene``, or None when the scene cannot support the skill."""
    questions = make_questions(skill, scene, rng, 1, cfg)
    return questions[0] if questions else None
