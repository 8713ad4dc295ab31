"""Held-out evaluation: greedy answers to each sample's last question, scored per skill."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from tqdm.auto import tqdm

from vlm_core.config import EvalConfig
from vlm_core.data.image import ImageProcessor
from vlm_core.data.tokenizer import ChatEncoder
from vlm_core.eval.generate import greedy_generate
from vlm_core.types import EvalReport, Sample, TokenizedSample, Turn

Scorer = Callable[[Sample, str], float]
NO_SKILL = "all"  # the bucket of samples that carry no skill tag
T = TypeVar("T")


def prompt_sample(turns: Sequence[Turn], images: torch.Tensor, encoder: ChatEncoder, sample_id: str) -> TokenizedSample:
    """``turns`` (ending with a user turn) plus the generation prompt, with their images ``[N_img, C, H, W]``."""
    input_ids = encoder.encode_prompt(turns)
    return TokenizedSample(
        input_ids=input_ids, loss_mask=torch.zeros_like(input_ids, dtype=torch.bool),
        bidir_group=encoder.bidir_groups(input_ids), images=images, sample_id=sample_id,
    )


def build_prompt(sample: Sample, encoder: ChatEncoder, processor: ImageProcessor) -> TokenizedSample:
    """The sample up to its last user turn, ending in the generation prompt."""
    if sample.turns[-1].role != "assistant":
        raise ValueError(f"eval sample {sample.id} ({sample.source}) must end with an assistant turn (the reference)")
    images = (
        torch.stack([processor(path) for path in sample.image_paths])
        if sample.image_paths
        else torch.zeros(0, 3, processor.image_size, processor.image_size)
    )
    return prompt_sample(sample.turns[:-1], images, encoder, sample.id)


def answer_prompts(
    model: nn.Module, items: Sequence[T], build: Callable[[T], TokenizedSample], tokenizer: Any,
    max_new_tokens: int, batch_size: int, show_progress: bool = False,
) -> list[str]:
    """Greedy answers to ``build(item)`` for each item, in order; prompts are built (images decoded) a batch at a time."""
    answers: list[str] = []
    was_training = model.training
    model.eval()
    chunks = range(0, len(items), batch_size)
    for start in tqdm(chunks, desc="    eval", disable=not show_progress, leave=False):
        prompts = [build(item) for item in items[start : start + batch_size]]  # prefill moves them to the model's device
        outputs = greedy_generate(model, prompts, max_new_tokens, eos_id=tokenizer.eos_token_id, batch_size=batch_size)
        answers += [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
    model.train(was_training)
    return answers


def answer_questions(
    model: nn.Module, samples: Sequence[Sample], encoder: ChatEncoder, processor: ImageProcessor,
    max_new_tokens: int, batch_size: int, show_progress: bool = False,
) -> list[str]:
    """Greedy answers to the last question of each sample, in order."""
    return answer_prompts(
        model, samples, lambda sample: build_prompt(sample, encoder, processor), encoder.tokenizer,
        max_new_tokens, batch_size, show_progress,
    )


def evaluate(
    model: nn.Module, samples: Sequence[Sample], encoder: ChatEncoder, processor: ImageProcessor,
    scorer: Scorer, chance: dict[str, float], cfg: EvalConfig, show_progress: bool = True,
) -> EvalReport:
    """Score ``model`` on ``samples``; ``overall`` is the mean over skills (each skill weighs the same)."""
    by_skill: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_skill[sample.skill or NO_SKILL].append(sample)
    if cfg.limit_per_skill is not None:
        by_skill = {skill: group[: cfg.limit_per_skill] for skill, group in by_skill.items()}
    # Skill by skill: answers within a skill have similar lengths, so decode batches finish together.
    ordered = [sample for skill in sorted(by_skill) for sample in by_skill[skill]]
    answers = answer_questions(
        model, ordered, encoder, processor, cfg.max_new_tokens, cfg.batch_size, show_progress
    )
    scores: dict[str, list[float]] = defaultdict(list)
    predictions = []
    for sample, answer in zip(ordered, answers):
        skill = sample.skill or NO_SKILL
        score = scorer(sample, answer)
        scores[skill].append(score)
        predictions.append({
            "id": sample.id, "skill": skill, "question": sample.turns[-2].text.replace("<image>", "").strip(),
            "answer": answer, "reference": sample.turns[-1].text, "score": score,
        })
    shown: dict[str, int] = defaultdict(int)
    examples = []
    for row in predictions:
        if shown[row["skill"]] < cfg.show_examples:
            shown[row["skill"]] += 1
            examples.append(row)
    skills = {skill: sum(v) / len(v) for skill, v in sorted(scores.items())}
    overall = sum(skills.values()) / max(1, len(skills))
    return EvalReport(
        overall=overall, skills=skills, counts={k: len(v) for k, v in sorted(scores.items())},
        chance={k: chance.get(k, float("nan")) for k in skills}, examples=examples, predictions=predictions,
    )


def render_table(report: EvalReport, title: str = "held-out accuracy") -> Table:
    table = Table(title=title)
    for column, justify in (("skill", "left"), ("n", "right"), ("accuracy", "right"), ("chance", "right"), ("Δ", "right")):
        table.add_column(column, justify=justify)
    for skill, accuracy in report.skills.items():
        chance = report.chance.get(skill, float("nan"))
        delta = accuracy - chance if chance == chance else float("nan")
        table.add_row(skill, str(report.counts[skill]), f"{accuracy:.3f}", f"{chance:.3f}", f"{delta:+.3f}")
    table.add_row("overall", str(sum(report.counts.values())), f"{report.overall:.3f}", "", "", style="bold")
    return table


def print_report(report: EvalReport, console: Console | None = None) -> None:
    (console or Console()).print(render_table(report))
