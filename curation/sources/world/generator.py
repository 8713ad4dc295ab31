"""The teacher: records of a requested skill at a requested difficulty, and the default train/eval splits.

A record is one scene plus 1..turns distinct questions of one skill about it. Record ``i`` of a request
draws everything from ``numpy.random.default_rng([seed, skill_index, i])``, so a record does not depend on
how many records were asked for, in which order, or in which batch: the teacher can be asked for "200
more count questions" and its first 100 are the same as a request for 100.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace

import numpy as np

from curation.sources.world.config import SKILLS, WorldConfig
from curation.sources.world.questions import Question, make_questions
from curation.sources.world.scene import Scene, sample_scene

SPLITS: tuple[str, ...] = ("train", "eval")
# Shapes a scene needs before the skill has anything to ask (spatial compares two shapes).
SKILL_MIN_SHAPES: dict[str, int] = {"spatial": 2}
# Scenes drawn per record before giving up. Unsupported scenes are rare with the default vocabulary (measured
# worst case 3%: colour questions with 6 shapes, where no shape kind occurs once), so 200 failures in a row
# means the request is impossible, not unlucky.
MAX_ATTEMPTS = 200


@dataclass(frozen=True)
class Difficulty:
    """How many shapes (words excluded) the scenes of a request hold: ``min_objects..max_objects``."""

    min_objects: int
    max_objects: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"Difficulty(min_objects={self.min_objects}, max_objects={self.max_objects}): "
                "need 1 <= min_objects <= max_objects"
            )

    @classmethod
    def from_config(cls, cfg: WorldConfig) -> Difficulty:
        """The world's default range, ``cfg.min_objects..cfg.max_objects``."""
        return cls(cfg.min_objects, cfg.max_objects)

    def __str__(self) -> str:
        return f"{self.min_objects}..{self.max_objects} objects"


@dataclass
class WorldRecord:
    """One image (as its scene graph) with 1..turns questions of one skill, belonging to ``split``."""

    id: str
    skill: str
    scene: Scene
    questions: list[Question] = field(default_factory=list)
    split: str = "teacher"
    caption_from: str = ""  # a noisy caption record: the id of the record whose caption it carries

    @property
    def n_objects(self) -> int:
        """Shapes in the scene (words are not counted, as in count questions and difficulty)."""
        return len(self.scene.shapes)


class WorldGenerator:
    """Generates :class:`WorldRecord` s of the world described by ``cfg``."""

    def __init__(self, cfg: WorldConfig) -> None:
        self.cfg = cfg
        self._splits: dict[str, list[WorldRecord]] = {}  # split() results; eval needs train's scene keys

    def _effective(self, skill: str, difficulty: Difficulty) -> Difficulty:
        """``difficulty`` raised to what ``skill`` needs, checked against what the grid can hold."""
        low = max(difficulty.min_objects, SKILL_MIN_SHAPES.get(skill, 1))
        high = max(difficulty.max_objects, low)
        cells = self.cfg.grid**2 - (1 if skill == "ocr" else 0)  # an OCR scene keeps a cell for its word
        pairs = len(self.cfg.colors) * len(self.cfg.shapes) - (1 if skill == "existence" else 0)
        if high > min(cells, pairs):
            raise ValueError(
                f"teacher request for {skill} at {difficulty}: at most {min(cells, pairs)} shapes fit "
                f"({cells} free cells of the {self.cfg.grid}x{self.cfg.grid} grid, {pairs} usable (color, shape) "
                "pairs); lower max_objects"
            )
        return Difficulty(low, high)

    def _record(
        self,
        skill: str,
        index: int,
        difficulty: Difficulty,
        seed: int,
        split: str,
        turns: int,
        avoid: Collection[str],
    ) -> WorldRecord:
        rng = np.random.default_rng([seed, SKILLS.index(skill), index])
        with_word = True if skill == "ocr" else None
        for _ in range(MAX_ATTEMPTS):
            n_objects = int(rng.integers(difficulty.min_objects, difficulty.max_objects + 1))
            scene = sample_scene(self.cfg, rng, n_objects=n_objects, with_word=with_word)
            if avoid and scene.key() in avoid:
                continue
            questions = make_questions(skill, scene, rng, turns, self.cfg)
            if questions:
                record_id = f"{split}-{skill}-{index:06d}"
                return WorldRecord(id=record_id, skill=skill, scene=scene, questions=questions, split=split)
        raise ValueError(
            f"no scene with {difficulty} supports a {skill} question after {MAX_ATTEMPTS} tries "
            f"(record {index}, seed {seed}); widen the difficulty or add colours/shapes to the world config"
        )

    def request(
        self,
        skill: str,
        n: int,
        difficulty: Difficulty | None = None,
        seed: int = 0,
        split: str = "teacher",
        turns: int = 1,
        avoid: Collection[str] = frozenset(),
    ) -> list[WorldRecord]:
        """``n`` records of ``skill`` at ``difficulty`` (default: the config's range), ids ``{split}-{skill}-{i:06d}``.

        Each record has 1..``turns`` distinct questions about its image (fewer when the scene supports
        fewer: a count question can only be asked once). Difficulty is raised to what the skill needs
        (spatial: two shapes). Scenes whose :meth:`Scene.key` is in ``avoid`` are redrawn; pass the eval
        split's keys so that new training data never repeats a held-out image. Records depend only on
        (``seed``, ``skill``, index), so use a seed other than ``cfg.seed``/``cfg.eval_seed`` for new data.
        """
        if skill not in SKILLS:
            raise ValueError(f"teacher request for unknown skill {skill!r}; expected one of {list(SKILLS)}")
        if n < 0 or turns < 1 or seed < 0:
            raise ValueError(
                f"teacher request for {skill}: need n >= 0, turns >= 1 and seed >= 0; "
                f"got n={n}, turns={turns}, seed={seed}"
            )
        effective = self._effective(skill, difficulty or Difficulty.from_config(self.cfg))
        return [self._record(skill, i, effective, seed, split, turns, avoid) for i in range(n)]

    def split(self, split: str) -> list[WorldRecord]:
        """The default dataset: every skill of ``cfg.skills``, records in skill order.

        ``train``: ``cfg.train_count(skill)`` records of ``cfg.turns_per_record`` turns from ``cfg.seed``.
        ``eval``: ``cfg.eval_per_skill`` single-turn records from ``cfg.eval_seed``, redrawing any scene
        that also occurs in train, so the held-out images are disjoint from the training images.
        """
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is unknown; expected one of {list(SPLITS)}")
        if split not in self._splits:
            cfg = self.cfg
            if split == "train":
                records = [
                    record
                    for skill in cfg.skills
                    for record in self.request(
                        skill, cfg.train_count(skill), seed=cfg.seed, split="train",
                        turns=cfg.turns_per_record,
                    )
                ]
                records = with_caption_noise(records, cfg.caption_noise, cfg.seed)
            else:
                train_keys = {record.scene.key() for record in self.split("train")}
                records = [
                    record
                    for skill in cfg.skills
                    for record in self.request(
                        skill, cfg.eval_per_skill, seed=cfg.eval_seed, split="eval", avoid=train_keys
                    )
                ]
            self._splits[split] = records
        return list(self._splits[split])


def with_caption_noise(records: list[WorldRecord], noise: float, seed: int) -> list[WorldRecord]:
    """``records`` with round(noise x captions) caption records carrying another chosen record's caption.

    The chosen records (drawn from ``seed``) pass their captions round a cycle, so every noisy caption
    describes another scene of the split and no caption text is lost; scenes and ids are unchanged and
    ``caption_from`` names the record whose caption was taken.
    """
    captions = [i for i, record in enumerate(records) if record.skill == "caption"]
    count = round(noise * len(captions))
    if count < 2:
        return records
    chosen = sorted(np.random.default_rng([seed, 7_919]).choice(captions, size=count, replace=False).tolist())
    out = list(records)
    for i, j in zip(chosen, chosen[1:] + chosen[:1]):
        donor = records[j]
        questions = [replace(q, answer=d.answer) for q, d in zip(records[i].questions, donor.questions)]
        questions += records[i].questions[len(questions):]
        out[i] = replace(records[i], questions=questions, caption_from=donor.id)
    return out
