"""POPE (Li et al. 2023, object hallucination): yes/no questions about objects, scored as binary classification.

File: JSONL as POPE ships it (``coco_pope_adversarial.json`` and its siblings), one question per line::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}

``question`` is accepted for ``text`` and ``answer`` for ``label``. ``category`` (random / popular /
adversarial) names the subset; without it the file's stem does. ``image`` is relative to the image folder.

Scoring follows POPE's evaluate.py: the answer is cut at its first period, commas are removed, and it
reads "no" if the words "No", "no" or "not" occur, "yes" otherwise. "yes" is the positive class:
accuracy, precision, recall, F1 and the yes-ratio (the share of "yes" answers) per subset and overall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_core.eval.formats.common import (
    BenchmarkItem,
    BenchmarkResult,
    FormatError,
    make_report,
    question_records,
    required,
)

LABELS = ("yes", "no")


def load(questions: Path, images: Path | None) -> list[BenchmarkItem]:
    """The questions of a POPE JSONL file; every image must exist inside ``images``."""
    items: list[BenchmarkItem] = []
    for line, record, question_id, image in question_records(questions, images, "POPE"):
        label = str(required(record, ("label", "answer"), questions, line)).strip().lower()
        if label not in LABELS:
            raise FormatError(questions, line, "label", f"{label!r} is not 'yes' or 'no'")
        items.append(BenchmarkItem(
            id=question_id, question=str(required(record, ("text", "question"), questions, line)).strip(), image=image,
            subset=str(record.get("category") or questions.stem), reference=label, source=f"{questions}:{line}",
        ))
    return items


def parse_answer(answer: str) -> str:
    """POPE's reading of a free-form answer as "yes" or "no"."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(predicted: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (positive = "yes") and yes-ratio; precision/recall are 0 when undefined."""
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predicted, labels))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predicted, labels))
    tn = sum(p == "no" and t == "no" for p, t in zip(predicted, labels))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predicted, labels))
    total = max(1, len(labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / total, "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": (tp + fp) / total, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": len(labels),
    }


def score(items: list[BenchmarkItem], answers: list[str], show_examples: int) -> BenchmarkResult:
    predicted = [parse_answer(answer) for answer in answers]
    labels = [item.reference for item in items]
    subsets = sorted({item.subset for item in items})
    per_subset = {
        subset: binary_metrics(
            [p for p, item in zip(predicted, items) if item.subset == subset],
            [t for t, item in zip(labels, items) if item.subset == subset],
        )
        for subset in subsets
    }
    overall = binary_metrics(predicted, labels)
    report = make_report(
        items, answers, [float(p == t) for p, t in zip(predicted, labels)],
        skills={subset: m["accuracy"] for subset, m in per_subset.items()}, overall=overall["accuracy"],
        chance=dict.fromkeys(subsets, 0.5), show_examples=show_examples,
    )
    return BenchmarkResult(report=report, metrics={"format": "pope", "overall": overall, "subsets": per_subset})
