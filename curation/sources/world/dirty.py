"""The dirty world: the clean world's training records plus planted defects, each labelled with what it is.

:func:`plan_dirty_world` is pure: from the clean records, the configs and the seed it returns every record
to write, with a description of its image (:class:`ImageSpec`) and its ground-truth class; the writer
(:mod:`curation.sources.world.dirty_writer`) turns that into files. Classes (``truth.jsonl``):

=================  ==================================================================================
``clean``          a record of the clean world, unchanged
``exact_dup``      a clean record again: same pixels (re-encoded PNG), text differing in case/spacing
``near_dup``       a clean record again: image re-compressed, noised, resampled or brightened; text paraphrased
``wrong_caption``  a new caption record whose caption describes another scene (a hallucinating teacher)
``blank``          a new record whose image is one flat colour
``corrupt``        a new record whose image file is truncated, garbage, empty, or fails its checksum
``bomb``           a new record whose image is a 110 KB PNG that decodes to 30000 x 30000 pixels
``path_escape``    a new record whose image path is absolute, climbs out with '..', or is a symlink out
``bad_record``     a record that breaks the format: bad JSON, bad bytes, missing fields, unknown role, ...
``skew``           surplus OCR records showing one word, so that it is ``skew_factor`` x as frequent
=================  ==================================================================================

Every planted record comes after all clean records in the file, so for a duplicate the clean copy is the
earlier one (the one dedup keeps).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curation.config import DirtyConfig
from curation.sources.world.config import SKILLS, WorldConfig
from curation.sources.world.generator import WorldGenerator, WorldRecord
from curation.sources.world.questions import make_questions
from curation.sources.world.scene import Scene, sample_scene
from curation.sources.world.writer import to_llava

__all__ = ["CLASSES", "ImageSpec", "PlannedRecord", "plan_dirty_world", "word_counts"]

CLASSES: tuple[str, ...] = (
    "clean", "exact_dup", "near_dup", "wrong_caption", "blank", "corrupt", "bomb", "path_escape", "bad_record", "skew",
)
CORRUPTIONS: tuple[str, ...] = ("truncated", "garbage", "empty", "bad_crc")
# Re-processings of the same picture. No shifts: in the world a shifted object is another scene (the scene's
# own jitter moves objects by up to a few pixels), so a shifted copy is not a duplicate of anything.
PERTURBATIONS: tuple[str, ...] = ("jpeg", "noise", "resample", "brightness")
ESCAPES: tuple[str, ...] = ("absolute", "dotdot", "symlink")
BAD_KINDS: tuple[str, ...] = (
    "bad_json", "non_utf8", "missing_conversations", "unknown_role", "empty_turn", "image_count", "too_long",
    "missing_image",
)
# Meaning-preserving rewrites for near duplicates' text (applied to the whole conversation).
PARAPHRASES: tuple[tuple[str, str], ...] = (
    (r"\bcolor\b", "colour"),
    (r"^What ", "Tell me: what "),
    (r"^How many", "Please count: how many"),
    (r"^Is ", "Tell me, is "),
    (r"\bin the image\b", "in this picture"),
    (r"\bimage\b", "picture"),
)
LONG_TEXT_CHARS = 20_000  # the over-long bad record; validate.max_chars defaults to 16,000


@dataclass(frozen=True)
class ImageSpec:
    """How to make one image file: ``kind`` render | perturb | blank | corrupt | bomb | none (no file)."""

    kind: str
    scene: Scene | None = None  # render, perturb, corrupt: the scene to draw
    variant: str = ""  # perturb: shift/noise/jpeg; corrupt: truncated/garbage/empty/bad_crc
    params: tuple[int, ...] = ()  # perturb noise: (sigma, seed); jpeg: (quality,); resample: (side,);
    # brightness: (percent,); blank: (r, g, b, seed)
    compress_level: int = 1  # PNG zlib level: exact duplicates use another level, so bytes differ but pixels do not


@dataclass
class PlannedRecord:
    """One record of the dirty source: the LLaVA dict, how to make its image, and its ground truth."""

    record: dict[str, Any]  # the LLaVA record; ``image`` is relative to the images/ folder
    truth: str  # one of CLASSES
    image: ImageSpec = field(default_factory=lambda: ImageSpec("none"))
    of: str | None = None  # duplicates: the id of the clean record copied
    detail: str = ""  # the variant planted (perturbation, corruption, bad-record kind, ...)
    raw_line: bytes | None = None  # bad JSON / bad bytes: written as this line instead of the record


def _image_path(record: WorldRecord | str, folder: str, suffix: str = "png") -> str:
    name = record if isinstance(record, str) else record.id
    return f"{folder}/{name}.{suffix}"


def _clean(record: WorldRecord, cfg: WorldConfig) -> PlannedRecord:
    rel = _image_path(record, "clean")
    return PlannedRecord(to_llava(record, rel, cfg.image_position), "clean", ImageSpec("render", record.scene))


def _respace(text: str, rng: np.random.Generator) -> str:
    """Same words, other case and spacing: equal after lower-casing and collapsing whitespace."""
    words = text.split(" ")
    out = " ".join(w.upper() if rng.random() < 0.3 and "<image>" not in w else w for w in words)
    return ("  " if rng.random() < 0.5 else "") + out.replace(" ", "  ", 1) + ("\n" if rng.random() < 0.5 else "")


def _paraphrase(text: str, rng: np.random.Generator) -> str:
    """A meaning-preserving rewrite of one human turn (kept apart from its ``<image>`` line)."""
    prefix = ""
    if text.startswith("<image>\n"):
        prefix, text = "<image>\n", text[len("<image>\n"):]
    order = rng.permutation(len(PARAPHRASES))
    changed = text
    for index in order:
        pattern, replacement = PARAPHRASES[index]
        changed = re.sub(pattern, replacement, changed, count=1)
        if changed != text and rng.random() < 0.5:
            break
    if changed == text:
        changed = text.rstrip("?.") + ", please?"
    return prefix + changed


def _answer_variant(text: str, rng: np.random.Generator) -> str:
    if len(text) < 20:  # short answers: "Red." ↔ "red"
        return text.rstrip(".").lower() if text.endswith(".") else text.capitalize() + "."
    return text


def _duplicate(record: WorldRecord, cfg: WorldConfig, kind: str, number: int, rng: np.random.Generator) -> PlannedRecord:
    new_id = f"{kind.replace('_', '-')}-{number:05d}"
    if kind == "exact_dup":
        llava = to_llava(record, _image_path(new_id, "planted"), cfg.image_position)
        for turn in llava["conversations"]:
            turn["value"] = _respace(turn["value"], rng)
        spec = ImageSpec("render", record.scene, compress_level=9)
        detail = "re-encoded PNG, respaced text"
    else:
        variant = PERTURBATIONS[int(rng.integers(len(PERTURBATIONS)))]
        if variant == "noise":
            params = (int(rng.integers(2, 7)), int(rng.integers(2**31)))  # sigma 2-6 grey levels
        elif variant == "jpeg":
            params = (int(rng.integers(70, 96)),)  # quality
        elif variant == "resample":
            params = (int(rng.integers(40, 57)),)  # down to this side, back up to the original size
        else:
            params = (int(rng.choice([-1, 1])) * int(rng.integers(4, 13)),)  # brightness change in percent
        suffix = "jpg" if variant == "jpeg" else "png"
        llava = to_llava(record, _image_path(new_id, "planted", suffix), cfg.image_position)
        turns = llava["conversations"]
        turns[0]["value"] = _paraphrase(turns[0]["value"], rng)
        for turn in turns[1::2]:
            turn["value"] = _answer_variant(turn["value"], rng)
        spec = ImageSpec("perturb", record.scene, variant, params)
        detail = f"{variant} {params}"
    llava["id"] = new_id
    return PlannedRecord(llava, kind, spec, of=record.id, detail=detail)


def word_counts(records: list[dict[str, Any]], words: list[str]) -> dict[str, int]:
    """Records whose text mentions each word (whole word, case-sensitive), as ``balance`` counts concepts."""
    counts = dict.fromkeys(words, 0)
    patterns = {word: re.compile(rf"\b{re.escape(word)}\b") for word in words}
    for record in records:
        text = " ".join(turn["value"] for turn in record["conversations"])
        for word, pattern in patterns.items():
            if pattern.search(text):
                counts[word] += 1
    return counts


def _skew_records(
    cfg: WorldConfig, dirty: DirtyConfig, clean: list[PlannedRecord], rng: np.random.Generator, avoid: set[str]
) -> list[PlannedRecord]:
    """OCR records of fresh scenes showing ``dirty.skew_word``, enough to make it ``skew_factor`` x an average word."""
    counts = word_counts([p.record for p in clean], list(cfg.words))
    average = sum(counts.values()) / max(1, len(counts))
    surplus = max(0, round(dirty.skew_factor * average) - counts.get(dirty.skew_word, 0))
    planted = []
    while len(planted) < surplus:
        n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        scene = sample_scene(cfg, rng, n_objects=n_objects, with_word=True)
        objects = tuple(
            dataclasses.replace(o, word=dirty.skew_word) if o.kind == "word" else o for o in scene.objects
        )
        scene = Scene(objects=objects, grid=scene.grid, image_size=scene.image_size)
        if scene.key() in avoid:
            continue
        avoid.add(scene.key())
        questions = make_questions("ocr", scene, rng, cfg.turns_per_record, cfg)
        record_id = f"skew-{len(planted):05d}"
        world_record = WorldRecord(id=record_id, skill="ocr", scene=scene, questions=questions, split="skew")
        rel = _image_path(record_id, "planted")
        planted.append(PlannedRecord(to_llava(world_record, rel, cfg.image_position), "skew",
                                     ImageSpec("render", scene), detail=dirty.skew_word))
    return planted


def _fresh(generator: WorldGenerator, n: int, seed: int, split: str, avoid: set[str]) -> list[WorldRecord]:
    """``n`` new records over all skills (round-robin) whose scenes occur nowhere else in the source."""
    per_skill = -(-n // len(SKILLS))
    records = [
        record
        for skill in SKILLS
        for record in generator.request(skill, per_skill, seed=seed, split=split, avoid=avoid)
    ]
    order = np.random.default_rng(seed).permutation(len(records))[:n]
    chosen = [records[i] for i in sorted(order)]
    avoid.update(record.scene.key() for record in chosen)
    return chosen


def _bad_record(kind: str, number: int, base: WorldRecord, cfg: WorldConfig) -> PlannedRecord:
    record_id = f"bad-{kind.replace('_', '-')}-{number:03d}"
    rel = _image_path(record_id, "planted")
    llava = to_llava(base, rel, cfg.image_position)
    llava["id"] = record_id
    spec = ImageSpec("render", base.scene)
    raw = None
    if kind == "bad_json":
        raw = (f'{{"id": "{record_id}", "image": "{rel}", "conversations": [{{"from": "human", "value": ').encode()
    elif kind == "non_utf8":
        raw = json.dumps(llava).replace("<image>", "<image>\udcff", 1).encode("utf-8", "surrogateescape")
    elif kind == "missing_conversations":
        del llava["conversations"]
    elif kind == "unknown_role":
        llava["conversations"][1]["from"] = "bot"
    elif kind == "empty_turn":
        llava["conversations"][1]["value"] = "   "
    elif kind == "image_count":
        llava["conversations"][0]["value"] = "<image>\n<image>\n" + llava["conversations"][0]["value"].replace("<image>", "")
    elif kind == "too_long":
        llava["conversations"][1]["value"] = ("All of these shapes are described at great length. " * 400)[:LONG_TEXT_CHARS]
    elif kind == "missing_image":
        llava["image"] = _image_path(record_id + "-never-written", "planted")
        spec = ImageSpec("none")
    return PlannedRecord(llava, "bad_record", spec, detail=kind, raw_line=raw)


def plan_dirty_world(
    cfg: WorldConfig, dirty: DirtyConfig, outside_image: str
) -> list[PlannedRecord]:
    """Every record of the dirty source, clean ones first, then the planted ones in a seeded random order.

    ``outside_image`` is the absolute path of an image outside the image root, for the absolute-path escape.
    """
    generator = WorldGenerator(cfg)
    clean_world = generator.split("train")
    clean = [_clean(record, cfg) for record in clean_world]
    n = len(clean_world)
    rng = np.random.default_rng([dirty.seed, 0])
    avoid = {record.scene.key() for record in clean_world} | {r.scene.key() for r in generator.split("eval")}

    planted: list[PlannedRecord] = []
    for kind in ("exact_dup", "near_dup"):
        count = round(getattr(dirty, kind) * n)
        for number, index in enumerate(rng.choice(n, size=min(count, n), replace=False)):
            planted.append(_duplicate(clean_world[int(index)], cfg, kind, number, rng))

    # Wrong captions: fresh scenes, each captioned with the caption of another fresh scene.
    count = round(dirty.wrong_caption * n)
    if count:
        images = generator.request("caption", count, seed=dirty.seed * 1000 + 1, split="wrongcap", avoid=avoid)
        avoid.update(r.scene.key() for r in images)
        texts = generator.request("caption", count, seed=dirty.seed * 1000 + 2, split="wrongcap", avoid=avoid)
        avoid.update(r.scene.key() for r in texts)
        for number, (image_record, text_record) in enumerate(zip(images, texts)):
            record_id = f"wrong-caption-{number:05d}"
            llava = to_llava(text_record, _image_path(record_id, "planted"), cfg.image_position)
            llava["id"] = record_id
            planted.append(PlannedRecord(llava, "wrong_caption", ImageSpec("render", image_record.scene),
                                         detail=f"caption of another scene ({text_record.id})"))

    for number, record in enumerate(_fresh(generator, round(dirty.blank * n), dirty.seed * 1000 + 3, "blank", avoid)):
        record_id = f"blank-{number:05d}"
        llava = to_llava(record, _image_path(record_id, "planted"), cfg.image_position)
        llava["id"] = record_id
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        spec = ImageSpec("blank", params=(*colour, int(rng.integers(2**31))))
        planted.append(PlannedRecord(llava, "blank", spec, detail=f"flat {colour}"))

    for number, record in enumerate(_fresh(generator, round(dirty.corrupt * n), dirty.seed * 1000 + 4, "corrupt", avoid)):
        record_id = f"corrupt-{number:05d}"
        variant = CORRUPTIONS[number % len(CORRUPTIONS)]
        llava = to_llava(record, _image_path(record_id, "planted"), cfg.image_position)
        llava["id"] = record_id
        planted.append(PlannedRecord(llava, "corrupt", ImageSpec("corrupt", record.scene, variant), detail=variant))

    extra = _fresh(generator, dirty.bombs + dirty.path_escapes + dirty.bad_records * len(BAD_KINDS),
                   dirty.seed * 1000 + 5, "extra", avoid)
    for number in range(dirty.bombs):
        record = extra.pop()
        record_id = f"bomb-{number:03d}"
        llava = to_llava(record, _image_path(record_id, "planted"), cfg.image_position)
        llava["id"] = record_id
        planted.append(PlannedRecord(llava, "bomb", ImageSpec("bomb"), detail="30000x30000 1-bit PNG"))
    for number in range(dirty.path_escapes):
        record = extra.pop()
        variant = ESCAPES[number % len(ESCAPES)]
        record_id = f"escape-{variant}-{number:03d}"
        rel = {"absolute": outside_image, "dotdot": "../outside/secret.png"}.get(variant, f"planted/{record_id}.png")
        llava = to_llava(record, rel, cfg.image_position)
        llava["id"] = record_id
        spec = ImageSpec("symlink") if variant == "symlink" else ImageSpec("none")
        planted.append(PlannedRecord(llava, "path_escape", spec, detail=variant))
    for kind in BAD_KINDS:
        for number in range(dirty.bad_records):
            planted.append(_bad_record(kind, number, extra.pop(), cfg))

    planted += _skew_records(cfg, dirty, clean, rng, avoid)
    order = rng.permutation(len(planted))
    return clean + [planted[i] for i in order]
