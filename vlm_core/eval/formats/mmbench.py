"""MMBench (Liu et al. 2023): multiple-choice questions in a TSV with base64 images, circular evaluation.

File: the TSV MMBench ships (``MMBench_DEV_EN.tsv``), tab-separated with a header. Columns used:
``index``, ``question``, ``hint`` (optional), ``A``, ``B`` and optionally ``C``, ``D`` (``E``), ``answer``
(the correct letter), ``image`` (base64; a short number instead refers to the image of the row with
that index, as the full MMBench files do), ``category`` (optional, the subset).

Prompt (LLaVA-1.5's model_vqa_mmbench): ``{hint}\\n{question}\\nA. {option}\\nB. {option}...`` followed by
the eval's prompt suffix. Circular evaluation (MMBench's CircularEval): a question with n options is
asked n times, the options rotated by one each time (A B C D, then B C D A, ...), and counts as right
only if every rotation is answered right. ``circular=False`` asks only the original order.

Answer matching, without an LLM judge: the one option letter that stands alone in the answer (``B``,
``B.``, ``(B)``, ``The answer is B``); with several, the one marked up front (``B. ...``); with none, the
one option whose text the answer contains; otherwise the answer is wrong.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from typing import Any

from vlm_core.eval.formats.common import (
    BenchmarkItem,
    BenchmarkResult,
    FormatError,
    decode_base64_image,
    make_report,
)

LETTERS = ("A", "B", "C", "D", "E")
REQUIRED_COLUMNS = ("index", "question", "A", "B", "answer", "image")
# A full MMBench TSV stores each distinct image once; rows that repeat it hold the index of that row.
_IMAGE_REFERENCE = re.compile(r"^\d{1,12}$")


def _missing(value: str | None) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() == "nan"  # pandas writes NaN as "nan"


def load(questions: Path, images: Path | None, circular: bool = True) -> list[BenchmarkItem]:
    """One item per (question, rotation); ``images`` is unused (the TSV carries its images)."""
    if not questions.is_file():
        raise FormatError(questions, None, None, "file not found")
    csv.field_size_limit(max(csv.field_size_limit(), sys.maxsize >> 1))  # base64 images exceed csv's 128 KiB default
    rows: list[tuple[int, dict[str, str]]] = []
    with open(questions, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        header = reader.fieldnames or []
        for column in REQUIRED_COLUMNS:
            if column not in header:
                raise FormatError(questions, 1, column, f"column missing from the header (found {header})")
        for row in reader:
            rows.append((reader.line_num, row))
    if not rows:
        raise FormatError(questions, None, None, "no questions in the file")
    images_by_index = {
        row["index"]: row["image"] or "" for _, row in rows if not _IMAGE_REFERENCE.match(row["image"] or "")
    }
    items: list[BenchmarkItem] = []
    seen: set[str] = set()
    for line, row in rows:
        index = (row.get("index") or "").strip()
        if not index:
            raise FormatError(questions, line, "index", "empty")
        if index in seen:
            raise FormatError(questions, line, "index", f"{index!r} appears twice")
        seen.add(index)
        if _missing(row.get("question")):
            raise FormatError(questions, line, "question", "empty")
        options = []
        for letter in LETTERS:
            if _missing(row.get(letter)):
                break
            options.append(row[letter].strip())
        if len(options) < 2:
            raise FormatError(questions, line, "B", "a question needs options A and B at least")
        extra = [letter for letter in LETTERS[len(options):] if not _missing(row.get(letter))]
        if extra:
            raise FormatError(questions, line, extra[0], f"option {extra[0]} is set but {LETTERS[len(options)]} is empty")
        answer = (row.get("answer") or "").strip()
        if answer not in LETTERS[: len(options)]:
            raise FormatError(questions, line, "answer", f"{answer!r} is not one of the options {list(LETTERS[:len(options)])}")
        encoded = row.get("image") or ""
        if _IMAGE_REFERENCE.match(encoded):
            if encoded not in images_by_index:
                raise FormatError(questions, line, "image", f"refers to the image of index {encoded}, which no row holds")
            encoded = images_by_index[encoded]
        image = decode_base64_image(encoded, questions, line)
        hint = None if _missing(row.get("hint")) else row["hint"].strip()
        category = None if _missing(row.get("category")) else row["category"].strip()
        correct = LETTERS.index(answer)
        for rotation in range(len(options) if circular else 1):
            rotated = options[rotation:] + options[:rotation]
            prompt = "\n".join(([hint] if hint else []) + [row["question"].strip()]
                               + [f"{letter}. {option}" for letter, option in zip(LETTERS, rotated)])
            items.append(BenchmarkItem(
                id=f"{index}@{rotation}", question=prompt, image=image, subset=category or "all",
                reference=LETTERS[(correct - rotation) % len(options)], source=f"{questions}:{line}",
                meta={"index": index, "rotation": rotation, "options": rotated},
            ))
    return items


def parse_answer(answer: str, options: list[str]) -> str | None:
    """The option letter an answer names, or None (see the module docstring for the rules)."""
    letters = LETTERS[: len(options)]
    text = answer.strip()
    alone = {letter for letter in re.findall(r"\b([A-E])\b", text) if letter in letters}
    if len(alone) == 1:
        return alone.pop()
    marked = re.match(r"^\(?([A-E])[.:)]", text)  # several letters: one marked as the answer up front ("B. not A")
    if alone and marked and marked.group(1) in letters:
        return marked.group(1)
    if alone:
        return None  # "A or B"
    lowered = text.lower()
    named = [letter for letter, option in zip(letters, options) if option.lower() in lowered]
    return named[0] if len(named) == 1 else None


def score(items: list[BenchmarkItem], answers: list[str], show_examples: int) -> BenchmarkResult:
    right = [parse_answer(answer, item.meta["options"]) == item.reference for item, answer in zip(items, answers)]
    by_question: dict[str, dict[str, Any]] = {}
    for item, ok in zip(items, right):
        entry = by_question.setdefault(
            item.meta["index"], {"subset": item.subset, "rotations": [], "n": len(item.meta["options"])}
        )
        entry["rotations"].append(ok)
    subsets = sorted({entry["subset"] for entry in by_question.values()})

    def summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(1, len(entries))
        return {
            "circular_accuracy": sum(all(e["rotations"]) for e in entries) / n,
            "vanilla_accuracy": sum(e["rotations"][0] for e in entries) / n,  # the original option order only
            "questions": len(entries),
            # Guessing uniformly: each rotation is right with probability 1/n options.
            "chance_circular": sum((1 / e["n"]) ** len(e["rotations"]) for e in entries) / n,
        }

    per_subset = {s: summary([e for e in by_question.values() if e["subset"] == s]) for s in subsets}
    overall = summary(list(by_question.values()))
    report = make_report(
        items, answers, [float(ok) for ok in right],
        skills={s: m["circular_accuracy"] for s, m in per_subset.items()}, overall=overall["circular_accuracy"],
        chance={s: m["chance_circular"] for s, m in per_subset.items()}, show_examples=show_examples,
        counts={s: m["questions"] for s, m in per_subset.items()},
    )
    return BenchmarkResult(report=report, metrics={"format": "mmbench", "overall": overall, "subsets": per_subset})
