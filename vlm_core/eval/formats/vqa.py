"""Free-form VQA: a question per line of a JSONL file, scored by exact and by normalized match.

File::

    {"question_id": "q1", "image": "val/0001.jpg", "question": "What color is the bus?", "answer": "red"}
    {"question_id": "q2", "image": "val/0002.jpg", "question": "How many dogs?", "answers": ["2", "two", "2"]}

``text`` is accepted for ``question``; ``answers`` may list strings or VQAv2's ``{"answer": ...}`` objects.
``category`` or ``question_type`` names the subset (default "all"). An answer is right if it matches
any reference: exactly (after stripping whitespace), or after normalization as in the VQA evaluation
script: lower case, punctuation removed (a period between digits kept), number words to digits, the
articles a/an/the dropped, whitespace collapsed.
"""

from __future__ import annotations

import re
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

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]")  # any punctuation except a decimal point


def load(questions: Path, images: Path | None) -> list[BenchmarkItem]:
    """The questions of a VQA JSONL file; every image must exist inside ``images``."""
    return [
        BenchmarkItem(
            id=question_id, question=str(required(record, ("question", "text"), questions, line)).strip(), image=image,
            subset=str(record.get("category") or record.get("question_type") or "all"),
            reference=_references(record, questions, line), source=f"{questions}:{line}",
        )
        for line, record, question_id, image in question_records(questions, images, "VQA")
    ]


def _references(record: dict[str, Any], path: Path, line: int) -> list[str]:
    value = required(record, ("answers", "answer"), path, line)
    values = value if isinstance(value, list) else [value]
    references = []
    for entry in values:
        text = entry.get("answer") if isinstance(entry, dict) else entry
        if not isinstance(text, (str, int, float)) or str(text).strip() == "":
            raise FormatError(path, line, "answers", f"{entry!r} is not an answer string")
        references.append(str(text))
    return references


def normalize(text: str) -> str:
    """VQA-style normalization (see the module docstring)."""
    text = _PUNCTUATION.sub("", text.lower().replace("\n", " "))
    words = [NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(word for word in words if word not in ARTICLES)


def score(items: list[BenchmarkItem], answers: list[str], show_examples: int) -> BenchmarkResult:
    exact = [any(answer.strip() == ref.strip() for ref in item.reference) for item, answer in zip(items, answers)]
    normalized = [
        any(normalize(answer) == normalize(ref) for ref in item.reference) for item, answer in zip(items, answers)
    ]
    subsets = sorted({item.subset for item in items})

    def summary(indices: list[int]) -> dict[str, Any]:
        n = max(1, len(indices))
        return {
            "exact_match": sum(exact[i] for i in indices) / n,
            "normalized_match": sum(normalized[i] for i in indices) / n,
            "n": len(indices),
        }

    per_subset = {s: summary([i for i, item in enumerate(items) if item.subset == s]) for s in subsets}
    overall = summary(list(range(len(items))))
    report = make_report(
        items, answers, [float(ok) for ok in normalized],
        skills={s: m["normalized_match"] for s, m in per_subset.items()}, overall=overall["normalized_match"],
        chance={}, show_examples=show_examples,
    )
    return BenchmarkResult(report=report, metrics={"format": "vqa", "overall": overall, "subsets": per_subset})
