"""Standard benchmark formats: read the file, ask the model greedily, score as the benchmark does.

    questions ──► load (pope|mme|mmbench|vqa) ──► [BenchmarkItem] ──► answer_items ──► score ──► BenchmarkResult
                                                 (image + question)    (greedy_generate)          (EvalReport + metrics)

Used by ``python -m vlm_core.eval`` and by ``train.py eval=<format>``. Each question is asked as a
single user turn ``<image>\\n{question}{eval.prompt_suffix}`` through the model's own chat template.
Bad files raise FormatError naming the file, the line and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlm_core.config import EvalConfig
from vlm_core.data.errors import DataError
from vlm_core.data.image import PIL_DECODE_ERRORS, ImageProcessor
from vlm_core.data.tokenizer import IMAGE_TOKEN, ChatEncoder
from vlm_core.eval.evaluate import answer_prompts, prompt_sample
from vlm_core.eval.formats import mmbench, mme, pope, vqa
from vlm_core.eval.formats.common import (
    BenchmarkItem,
    BenchmarkResult,
    FormatError,
    limit_per_subset,
    open_image,
)
from vlm_core.model.vlm import VLM
from vlm_core.types import TokenizedSample, Turn

FORMATS = {"pope": pope, "mme": mme, "mmbench": mmbench, "vqa": vqa}

__all__ = [
    "FORMATS", "BenchmarkItem", "BenchmarkResult", "FormatError", "answer_items", "load_benchmark", "run_benchmark",
]


def load_benchmark(cfg: EvalConfig) -> list[BenchmarkItem]:
    """The items of ``cfg.questions`` in ``cfg.format``, at most ``cfg.limit_per_skill`` per subset."""
    if cfg.format not in FORMATS:
        raise ValueError(f"eval.format={cfg.format!r} is not a benchmark format; expected one of {sorted(FORMATS)}")
    if cfg.questions is None:
        raise ValueError(f"eval.format={cfg.format} needs eval.questions=PATH (the benchmark's questions)")
    questions = Path(cfg.questions).expanduser()
    images = Path(cfg.images).expanduser() if cfg.images is not None else None
    if images is not None and not images.is_dir():
        raise FormatError(images, None, None, "eval.images is not a folder")
    if cfg.format == "mmbench":  # whole questions, with all their rotations
        return limit_per_subset(mmbench.load(questions, images, circular=cfg.circular), cfg.limit_per_skill, "index")
    items = FORMATS[cfg.format].load(questions, images)
    if cfg.format == "mme":  # whole images, so that acc+ sees both questions of each
        return limit_per_subset(items, cfg.limit_per_skill, "image_key")
    return limit_per_subset(items, cfg.limit_per_skill)


def build_prompt(item: BenchmarkItem, encoder: ChatEncoder, processor: ImageProcessor, suffix: str) -> TokenizedSample:
    """One user turn ``<image>\\n{question}{suffix}`` ending in the generation prompt, with its image."""
    try:
        with open_image(item.image) as image:
            pixels = processor.from_pil(image)[None]  # [1, C, H, W]
    except (DataError, *PIL_DECODE_ERRORS) as exc:  # a corrupt or truncated image file
        what = item.image if isinstance(item.image, Path) else "the inline image"
        raise FormatError(item.source, None, "image", f"cannot decode {what}: {exc}") from exc
    try:
        return prompt_sample([Turn("user", f"{IMAGE_TOKEN}\n{item.question}{suffix}")], pixels, encoder, item.id)
    except ValueError as exc:  # e.g. a chat control token inside the question
        raise FormatError(item.source, None, "question", str(exc)) from exc


def answer_items(
    model: VLM, items: Sequence[BenchmarkItem], encoder: ChatEncoder, processor: ImageProcessor, suffix: str,
    max_new_tokens: int, batch_size: int, show_progress: bool = False,
) -> list[str]:
    """Greedy answers, in order; prompts are built (and images decoded) one batch at a time."""
    return answer_prompts(
        model, items, lambda item: build_prompt(item, encoder, processor, suffix), encoder.tokenizer,
        max_new_tokens, batch_size, show_progress,
    )


def score_benchmark(cfg: EvalConfig, items: list[BenchmarkItem], answers: list[str]) -> BenchmarkResult:
    return FORMATS[cfg.format].score(items, answers, cfg.show_examples)


def run_benchmark(
    model: VLM, encoder: ChatEncoder, processor: ImageProcessor, cfg: EvalConfig, show_progress: bool = False
) -> BenchmarkResult:
    """Load ``cfg``'s benchmark, answer every item greedily, and score it."""
    items = load_benchmark(cfg)
    answers = answer_items(
        model, items, encoder, processor, cfg.prompt_suffix or "", cfg.max_new_tokens, cfg.batch_size, show_progress
    )
    result = score_benchmark(cfg, items, answers)
    result.metrics.update(
        {"questions_file": str(cfg.questions), "prompt_suffix": cfg.prompt_suffix, "items": len(items)}
    )
    return result
