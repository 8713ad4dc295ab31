"""The exact oracle: score any answer against the scene graph.

The truth is recomputed from the scene and the question's oracle fields (``Question.meta``), never read
from a stored answer string, so a corrupted or hallucinated reference answer cannot make a wrong model
answer look right. Short answers score 1.0 or 0.0 after normalisation; captions score the F1 between the
object phrases they contain and the scene's true phrases, so a hallucinated object lowers the score.
"""

from __future__ import annotations

import re
from typing import Any

from curation.sources.world.config import COLORS, SHAPES, SKILLS, WorldConfig
from curation.sources.world.layout import position_name
from curation.sources.world.questions import caption_phrases, caption_text
from curation.sources.world.scene import Scene, WorldObject

# Caption phrases are joined by ", ", but a position on a non-3x3 grid ("row 2, column 4") contains one.
_PHRASE_SPLIT = re.compile(r",(?!\s*column\b)\s*")
_WORD_MENTION = re.compile(r"\bword\s+([a-z]+)\b")


def normalize(answer: str) -> str:
    """Lowercase, collapse whitespace, drop one trailing period: "Red." and " red " both become "red"."""
    text = " ".join(answer.split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def _find_shape(scene: Scene, color: str, shape: str) -> WorldObject:
    matches = [o for o in scene.shapes if o.color == color and o.shape == shape]
    if len(matches) != 1:
        raise ValueError(f"question meta names the {color} {shape}, which the scene has {len(matches)} times, not once")
    return matches[0]


def _field(meta: dict[str, Any], name: str, skill: str) -> Any:
    if name not in meta:
        raise ValueError(f"{skill} question meta {meta} lacks the field {name!r}; was it written by this world?")
    return meta[name]


def reference_answer(skill: str, scene: Scene, meta: dict[str, Any]) -> str:
    """The correct answer to the question described by (``skill``, ``meta``), derived from the scene graph.

    Raises ValueError when the meta does not describe a question this scene can answer (for example a
    colour question about a shape that occurs twice).
    """
    if skill == "caption":
        return caption_text(scene)
    if skill == "color":
        shape = _field(meta, "shape", skill)
        matches = [o for o in scene.shapes if o.shape == shape]
        if len(matches) != 1:
            raise ValueError(f"color question about the {shape}, which the scene has {len(matches)} times, not once")
        return matches[0].color
    if skill == "shape":
        color = _field(meta, "color", skill)
        matches = [o for o in scene.objects if o.color == color]
        if len(matches) != 1 or matches[0].kind != "shape":
            raise ValueError(f"shape question about the {color} object, but the scene has no unique {color} shape")
        return str(matches[0].shape)
    if skill == "count":
        return str(len(scene.shapes))
    if skill == "spatial":
        a = _find_shape(scene, _field(meta, "a_color", skill), _field(meta, "a_shape", skill))
        b = _find_shape(scene, _field(meta, "b_color", skill), _field(meta, "b_shape", skill))
        axis = _field(meta, "axis", skill)
        if axis == "horizontal" and a.col != b.col:
            return "left" if a.col < b.col else "right"
        if axis == "vertical" and a.row != b.row:
            return "above" if a.row < b.row else "below"
        raise ValueError(f"spatial question on axis {axis!r} about objects at {a.cell} and {b.cell} has no answer")
    if skill == "ocr":
        word = scene.word_object
        if word is None:
            raise ValueError("ocr question about a scene without a word")
        return str(word.word)
    if skill == "existence":
        color, shape = _field(meta, "color", skill), _field(meta, "shape", skill)
        return "yes" if any(o.color == color and o.shape == shape for o in scene.shapes) else "no"
    if skill == "grounding":
        target = _find_shape(scene, _field(meta, "color", skill), _field(meta, "shape", skill))
        return position_name(target.row, target.col, scene.grid)
    raise ValueError(f"skill {skill!r} is unknown; expected one of {list(SKILLS)}")


def parse_caption(answer: str) -> list[str]:
    """The normalised phrases of a caption, in order, empty phrases dropped."""
    return [phrase.strip() for phrase in _PHRASE_SPLIT.split(normalize(answer)) if phrase.strip()]


def caption_f1(scene: Scene, answer: str) -> float:
    """F1 between the set of phrases in ``answer`` and the scene's true phrases (1.0 for an exact caption).

    Precision drops with every hallucinated or mis-described object, recall with every missed one.
    """
    predicted = set(parse_caption(answer))
    truth = {normalize(p) for p in caption_phrases(scene)}
    if not predicted and not truth:
        return 1.0
    return 2 * len(predicted & truth) / (len(predicted) + len(truth))


def caption_hallucinations(scene: Scene, answer: str) -> list[str]:
    """Phrases of a caption that mention an object the scene does not have, in the caption's order.

    A phrase mentions a shape when it names one of the world's shapes (with or without a colour) and a word
    when it says "word XYZ". A right object with a wrong size or position is an attribute error, not a
    hallucination; phrases that name no object at all are ignored here (caption F1 still penalises them).
    """
    present = {(o.color, o.shape) for o in scene.shapes}
    word = scene.word_object
    scene_word = str(word.word).lower() if word is not None else None
    hallucinated = []
    for phrase in parse_caption(answer):
        tokens = phrase.split()
        mention = _WORD_MENTION.search(phrase)
        if mention is not None:
            if mention.group(1) != scene_word:
                hallucinated.append(phrase)
            continue
        shapes = [t for t in tokens if t in SHAPES]
        if not shapes:
            continue
        colors = [t for t in tokens if t in COLORS]
        shape, color = shapes[0], (colors[0] if colors else None)
        if not any(s == shape and (color is None or c == color) for c, s in present):
            hallucinated.append(phrase)
    return hallucinated


def check_answer(skill: str, scene: Scene, meta: dict[str, Any], answer: str) -> float:
    """Score ``answer`` in [0, 1] against the truth recomputed from ``scene`` and the question's ``meta``.

    Short answers: 1.0 when equal to the truth after :func:`normalize` (so OCR compares case-insensitively),
    else 0.0. Captions: :func:`caption_f1`.
    """
    if skill == "caption":
        return caption_f1(scene, answer)
    return float(normalize(answer) == normalize(reference_answer(skill, scene, meta)))


def chance_level(skill: str, cfg: WorldConfig) -> float:
    """Expected score of guessing uniformly from the skill's answer space (0.0 for free-form captions)."""
    levels = {
        "caption": 0.0,
        "color": 1 / len(cfg.colors),
        "shape": 1 / len(cfg.shapes),
        "count": 1 / (cfg.max_objects - cfg.min_objects + 1),
        "spatial": 0.5,
        "ocr": 1 / len(cfg.words),
        "existence": 0.5,
        "grounding": 1 / cfg.grid**2,
    }
    if skill not in levels:
        raise ValueError(f"skill {skill!r} is unknown; expected one of {list(SKILLS)}")
    return levels[skill]
