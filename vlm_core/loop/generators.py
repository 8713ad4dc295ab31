"""Generators of a round's increment: the world teacher, VILA²-style self-augmentation, an HTTP teacher.

Each takes the per-category counts the sampler planned and returns :class:`Generated`: validated
``Sample`` s (absolute image paths) with the scene graph of each image, so the oracle can verify them.

- :class:`WorldTeacher` asks the built-in world for targeted records (ALLaVA's and MLLM-DataEngine's GPT-4V).
- :class:`SelfAugment` lets the current model recaption pool images; a verifier scores each caption against
  the scene graph and keeps the faithful ones (VILA²'s self-augment step; for real data the verifier would be
  image-text alignment).
- :class:`HttpTeacher` sends the world's questions with their images to any OpenAI-compatible
  ``/v1/chat/completions`` endpoint and keeps the answers the oracle accepts.
- :class:`SpecialistAugment` lets skill specialists (the current model fine-tuned on one skill) label pool
  images with new questions of their skill (VILA²'s specialist-augment step).
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from curation.sources.world import (
    SKILLS,
    Difficulty,
    Scene,
    WorldConfig,
    WorldGenerator,
    WorldRecord,
    caption_f1,
    caption_hallucinations,
    check_answer,
    make_questions,
    to_llava,
)
from curation.sources.world.writer import render_images
from vlm_core.loop.config import HttpTeacherConfig, SelfAugmentConfig, SpecialistConfig, TeacherConfig
from vlm_core.types import Sample, Turn

log = logging.getLogger(__name__)

# Teacher seeds live far from the world's own (cfg.seed, cfg.eval_seed), one block per loop seed and round.
TEACHER_SEED_BASE = 50_000


@dataclass
class Generated:
    """One generator's output for one round."""

    generator: str
    samples: list[Sample]
    scenes: dict[str, Scene]  # absolute image path → scene graph
    requested: dict[str, int]  # category → samples asked for
    rejected: dict[str, int] = field(default_factory=dict)  # category → dropped by the verifier
    # category → share of the generator's labels the world's oracle accepts (generators that label without it)
    oracle_agreement: dict[str, float] = field(default_factory=dict)

    def produced(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sample in self.samples:
            counts[sample.skill or "none"] = counts.get(sample.skill or "none", 0) + 1
        return counts


def merge_generated(first: Generated, more: Generated) -> Generated:
    """One generator's output over several passes: the first pass's request, every pass's samples and rejections."""
    rejected = dict(first.rejected)
    for skill, n in more.rejected.items():
        rejected[skill] = rejected.get(skill, 0) + n
    return Generated(first.generator, first.samples + more.samples, {**first.scenes, **more.scenes},
                     first.requested, rejected, first.oracle_agreement)


def teacher_seed(loop_seed: int, round_index: int) -> int:
    return TEACHER_SEED_BASE + 1000 * loop_seed + round_index


def record_sample(record: WorldRecord, image_path: Path, source: str, image_position: str,
                  answers: Sequence[str] | None = None) -> Sample:
    """A world record as a Sample, optionally with other answers (a teacher's) in place of the oracle's."""
    row = to_llava(record, image_path.name, image_position)
    turns = []
    for k, message in enumerate(row["conversations"]):
        text = message["value"]
        if message["from"] == "gpt" and answers is not None:
            text = answers[k // 2]
        turns.append(Turn("user" if message["from"] == "human" else "assistant", text))
    return Sample(id=record.id, source=source, image_paths=(image_path,), turns=tuple(turns), skill=record.skill,
                  meta=row["meta"])


class WorldTeacher:
    """Targeted records from the built-in world: the requested skills, harder scenes for weak ones."""

    name = "teacher"

    def __init__(self, world: WorldConfig, cfg: TeacherConfig, image_dir: Path, avoid: frozenset[str]) -> None:
        self.world, self.cfg, self.image_dir, self.avoid = world, cfg, Path(image_dir), avoid
        self.generator = WorldGenerator(world)

    def difficulty(self, score: float | None) -> Difficulty:
        low, high = self.world.min_objects, self.world.max_objects
        if self.cfg.harder_for_weak and score is not None and score < self.cfg.weak_below:
            low = max(low, (low + high + 1) // 2)  # the upper half of the range: where the errors are
        return Difficulty(low, high)

    def records(self, plan: dict[str, int], seed: int, split: str, scores: dict[str, float]) -> list[WorldRecord]:
        return [
            record
            for skill, n in sorted(plan.items()) if n > 0
            for record in self.generator.request(skill, n, self.difficulty(scores.get(skill)), seed=seed, split=split,
                                                 turns=self.cfg.turns, avoid=self.avoid)
        ]

    def render(self, records: Sequence[WorldRecord]) -> list[Path]:
        paths = [self.image_dir / record.split / f"{record.id}.png" for record in records]
        for path in {p.parent for p in paths}:
            path.mkdir(parents=True, exist_ok=True)
        render_images(self.world, [(r.scene, str(p)) for r, p in zip(records, paths)], workers=1, show_progress=False)
        return paths

    def generate(self, plan: dict[str, int], seed: int, split: str, source: str,
                 scores: dict[str, float] | None = None) -> Generated:
        records = self.records(plan, seed, split, scores or {})
        paths = self.render(records)
        samples = [record_sample(r, p, source, self.world.image_position) for r, p in zip(records, paths)]
        return Generated(self.name, samples, {str(p): r.scene for r, p in zip(records, paths)}, dict(plan))


AnswerFn = Callable[[Sequence[Sample]], list[str]]  # greedy answers to the last question of each sample


def verify_caption(scene: Scene, caption: str, cfg: SelfAugmentConfig) -> bool:
    """The world's caption verifier: enough of the scene named, nothing named that is not there."""
    return caption_f1(scene, caption) >= cfg.min_f1 and len(caption_hallucinations(scene, caption)) <= cfg.max_hallucinations


def caption_window(pool: Sequence[Sample], images: int, round_index: int) -> list[Sample]:
    """Round k's share of the pool's caption images: the next ``images`` after round k-1's, wrapping around.

    Successive rounds walk the pool, so over rounds every caption image is recaptioned (VILA² recaptions the
    whole pretraining set); with ``images`` at least the pool's caption count, every round takes all of them.
    """
    captions = [s for s in pool if s.skill == "caption"]
    if not captions or images <= 0:
        return []
    if images >= len(captions):
        return captions
    start = (max(round_index, 1) - 1) * images % len(captions)
    return [captions[(start + i) % len(captions)] for i in range(images)]


class SelfAugment:
    """VILA²: the current model recaptions pool images; verified captions become new training samples.

    Round k recaptions ``images`` caption images of the pool, continuing where round k-1 stopped
    (:func:`caption_window`).

    A faithful caption (nothing invented beyond ``max_hallucinations``) replaces the pool's caption of that
    image when it scores higher against the scene graph, even below ``min_f1`` unless ``replace_if_better``
    is off (``meta["replaces"]`` names the pool sample; the curation step drops it). Other captions join only
    if verified (``min_f1``). On the clean world the pool's captions are exact, so nothing is replaced there;
    with ``data.world.caption_noise`` the noisy ones are what gets replaced.
    """

    name = "self_augment"

    def __init__(self, cfg: SelfAugmentConfig, answer: AnswerFn) -> None:
        self.cfg, self.answer = cfg, answer

    def generate(self, pool: Sequence[Sample], scene_of: Callable[[Sample], Scene | None], source: str,
                 round_index: int) -> Generated:
        chosen = caption_window(pool, self.cfg.images, round_index)
        captions = self.answer(chosen) if chosen else []
        samples, scenes, rejected = [], {}, 0
        for sample, caption in zip(chosen, captions):
            scene = scene_of(sample)
            if scene is None or not caption:
                rejected += 1
                continue
            f1, old = caption_f1(scene, caption), caption_f1(scene, sample.turns[-1].text)
            faithful = len(caption_hallucinations(scene, caption)) <= self.cfg.max_hallucinations
            better = faithful and f1 > old and (self.cfg.replace_if_better or f1 >= self.cfg.min_f1)
            if not (better or verify_caption(scene, caption, self.cfg)):
                rejected += 1
                continue
            meta = {**sample.meta, "recaptioned_from": sample.id, "verifier_f1": f1}
            if better:
                meta["replaces"] = sample.id
            turns = (*sample.turns[:-1], Turn("assistant", caption))
            samples.append(Sample(id=f"r{round_index}-recap-{sample.id}", source=source,
                                  image_paths=sample.image_paths, turns=turns, skill="caption", meta=meta))
            scenes[str(sample.image_paths[0])] = scene
        return Generated(self.name, samples, scenes, {"caption": len(chosen)}, {"caption": rejected})


def image_data_url(path: Path) -> str:
    """An image file as a base64 data URL, as the OpenAI chat API takes images."""
    kind = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png"
    return f"data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def chat_request(url: str, model: str, question: str, image: Path, max_tokens: int, timeout_s: float,
                 api_key: str | None = None, image_position: str = "first") -> str:
    """One chat-completions call with one image; returns the assistant message's text.

    ``image_position`` orders the parts as the world writes its prompts (``data.world.image_position``), so a
    server that joins the parts in order, like :mod:`vlm_core.loop.server`, sees the layout its model learned.
    """
    text = {"type": "text", "text": question}
    picture = {"type": "image_url", "image_url": {"url": image_data_url(image)}}
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": [picture, text] if image_position == "first" else [text, picture]}],
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        payload = json.loads(response.read())
    try:
        return str(payload["choices"][0]["message"]["content"] or "").strip()
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"{url}: the reply is not a chat completion ({exc}): {str(payload)[:200]}") from exc


class HttpTeacher:
    """The world asks (scene, question), an OpenAI-compatible endpoint answers; the oracle checks the answer."""

    name = "http"

    def __init__(self, cfg: HttpTeacherConfig, world_teacher: WorldTeacher) -> None:
        self.cfg, self.world_teacher = cfg, world_teacher

    def generate(self, plan: dict[str, int], seed: int, split: str, source: str,
                 scores: dict[str, float] | None = None) -> Generated:
        records = self.world_teacher.records(plan, seed, split, scores or {})
        paths = self.world_teacher.render(records)
        samples, scenes, rejected = [], {}, {}
        for record, path in zip(records, paths):
            answers = []
            for question in record.questions:
                text = question.text  # the image goes with the message as a data URL, not as a placeholder
                answers.append(chat_request(self.cfg.url, self.cfg.model, text, path, self.cfg.max_tokens,
                                            self.cfg.timeout_s, self.cfg.api_key,
                                            self.world_teacher.world.image_position))
            good = all(answers) and (not self.cfg.verify or all(
                check_answer(record.skill, record.scene, q.meta, a) >= self.cfg.min_score
                for q, a in zip(record.questions, answers)))
            if not good:
                rejected[record.skill] = rejected.get(record.skill, 0) + 1
                continue
            samples.append(record_sample(record, path, source, self.world_teacher.world.image_position, answers))
            scenes[str(path)] = record.scene
        log.info("http teacher %s: %d of %d records kept", self.cfg.url, len(samples), len(records))
        return Generated(self.name, samples, scenes, dict(plan), rejected)


class SpecialistAugment:
    """VILA²'s specialist-augment step: skill specialists label pool images with new questions of their skill.

    For each of ``cfg.skills`` with a count in ``requests``, pool images whose sample is of another skill and
    whose scene supports a question of this one are drawn (seeded by the loop's seed, the round and the skill);
    the world asks one question about each, and the skill's specialist, ``answer_for(skill)``, answers. The
    answer is the new sample's label. The world's oracle scores every label: the share it accepts is recorded
    per skill, and with ``cfg.verify`` the rejected labels are dropped (counted in ``rejected``).
    ``answer_for`` is called only for skills with something to label (it may train the specialist first).
    """

    name = "specialist"

    def __init__(self, cfg: SpecialistConfig, world: WorldConfig, answer_for: Callable[[str], AnswerFn]) -> None:
        self.cfg, self.world, self.answer_for = cfg, world, answer_for

    def requests(self, plan: dict[str, int]) -> dict[str, int]:
        """The specialists' part of ``plan``: ``share`` of each specialist skill's count (rounded half up)."""
        shares = {skill: int(self.cfg.share * plan.get(skill, 0) + 0.5) for skill in self.cfg.skills}
        return {skill: n for skill, n in shares.items() if n > 0}

    def prompts(self, pool: Sequence[Sample], scene_of: Callable[[Sample], Scene | None], skill: str, n: int,
                seed: int, round_index: int, source: str) -> list[tuple[Sample, Scene]]:
        """Up to ``n`` new questions of ``skill`` on pool images of other skills, as samples with the oracle's
        answer in place (replaced by the specialist's); fewer when fewer images support the skill."""
        rng = np.random.default_rng([seed, round_index, SKILLS.index(skill)])
        out: list[tuple[Sample, Scene]] = []
        for i in rng.permutation(len(pool)):
            if len(out) == n:
                break
            sample = pool[int(i)]
            scene = scene_of(sample)
            if sample.skill == skill or scene is None:
                continue
            questions = make_questions(skill, scene, rng, 1, self.world)
            if not questions:
                continue
            record = WorldRecord(id=f"r{round_index}-{skill}-{sample.id}", skill=skill, scene=scene,
                                 questions=questions, split=f"r{round_index}")
            labelled = record_sample(record, sample.image_paths[0], source, self.world.image_position)
            out.append((replace(labelled, meta={**labelled.meta, "labelled_from": sample.id}), scene))
        return out

    def generate(self, pool: Sequence[Sample], scene_of: Callable[[Sample], Scene | None], requests: dict[str, int],
                 seed: int, source: str, round_index: int) -> Generated:
        samples, scenes, rejected, agreement = [], {}, {}, {}
        for skill, n in sorted(requests.items()):
            prompts = self.prompts(pool, scene_of, skill, n, seed, round_index, source)
            if len(prompts) < n:
                log.info("specialist %s: only %d of %d requested pool images support a %s question", skill,
                         len(prompts), n, skill)
            if not prompts:
                continue
            answers = self.answer_for(skill)([sample for sample, _ in prompts])
            accepted = 0
            for (sample, scene), answer in zip(prompts, answers):
                score = check_answer(skill, scene, sample.meta["questions"][0], answer) if answer else 0.0
                accepted += score >= 1.0
                if not answer or (self.cfg.verify and score < 1.0):
                    rejected[skill] = rejected.get(skill, 0) + 1
                    continue
                samples.append(replace(sample, turns=(*sample.turns[:-1], Turn("assistant", answer)),
                                       meta={**sample.meta, "oracle_score": score}))
                scenes[str(sample.image_paths[0])] = scene
            agreement[skill] = round(accepted / len(prompts), 4)
            log.info("specialist %s: the oracle accepts %d of %d labels (%.1f%%); %d kept", skill, accepted,
                     len(prompts), 100 * accepted / len(prompts), len(prompts) - rejected.get(skill, 0))
        return Generated(self.name, samples, scenes, dict(requests), rejected, agreement)
