"""MME (Fu et al. 2023): 14 subtasks of yes/no questions, two per image, scored as acc + acc+ per subtask.

Layout, as the benchmark ships (``MME_Benchmark_release_version``): one folder per subtask, and per
image a text file with the image's stem holding its questions, one per line, ``question<TAB>Yes|No``::

    MME/existence/000000006040.jpg + MME/existence/000000006040.txt
    MME/artwork/images/10002.jpg   + MME/artwork/questions_answers_YN/10002.txt

``--questions`` is the root folder; ``--images`` defaults to it (images are looked up under the same
subtask folder). Scoring follows MME's eval_tool/calculation.py: the answer is lower-cased and reads
"yes"/"no" if it is exactly that, else if its first four characters contain "yes" (then "no"), else
it is wrong. Per subtask: acc = right questions / questions, acc+ = images with every question right /
images, score = 100 * acc + 100 * acc+ (0 to 200); perception and cognition totals sum their subtasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_core.eval.formats.common import (
    BenchmarkItem,
    BenchmarkResult,
    FormatError,
    image_in_folder,
    make_report,
)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
ANSWERS = {"yes": "yes", "no": "no"}


def load(questions: Path, images: Path | None) -> list[BenchmarkItem]:
    """Every question of every subtask folder under ``questions`` (sorted: subtask, image, line)."""
    root = questions
    image_root = images if images is not None else root
    if not root.is_dir():
        raise FormatError(root, None, None, "MME expects the benchmark's root folder (one folder per subtask)")
    items: list[BenchmarkItem] = []
    for subtask_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        split = (subtask_dir / "questions_answers_YN").is_dir()
        text_dir = subtask_dir / "questions_answers_YN" if split else subtask_dir
        image_dir = Path(subtask_dir.name) / ("images" if split else "")
        for text_file in sorted(text_dir.glob("*.txt")):
            items.extend(_read_question_file(text_file, subtask_dir.name, image_root, image_dir))
    if not items:
        raise FormatError(root, None, None, "no subtask folder with question files (<image stem>.txt) found")
    return items


def _read_question_file(text_file: Path, subtask: str, image_root: Path, image_dir: Path) -> list[BenchmarkItem]:
    image = None
    for suffix in IMAGE_SUFFIXES:
        candidate = image_root / image_dir / (text_file.stem + suffix)
        if candidate.is_file():
            image = image_in_folder(image_root, str(image_dir / candidate.name), text_file, 1)
            break
    if image is None:
        raise FormatError(
            text_file, 1, "image",
            f"no image {text_file.stem}{{{','.join(IMAGE_SUFFIXES[:3])}}} in {image_root / image_dir}",
        )
    items = []
    for line, text in enumerate(text_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        columns = text.rstrip("\r\n").split("\t")
        if len(columns) != 2:
            raise FormatError(text_file, line, "answer", f"expected 'question<TAB>Yes|No', got {len(columns)} column(s)")
        question, answer = columns[0].strip(), columns[1].strip().lower()
        if not question:
            raise FormatError(text_file, line, "question", "empty question")
        if answer not in ANSWERS:
            raise FormatError(text_file, line, "answer", f"{columns[1].strip()!r} is not Yes or No")
        items.append(BenchmarkItem(
            id=f"{subtask}/{text_file.stem}/{line}", question=question, image=image, subset=subtask, reference=answer,
            source=f"{text_file}:{line}", meta={"image_key": f"{subtask}/{text_file.stem}"},
        ))
    if not items:
        raise FormatError(text_file, None, None, "no questions in the file")
    return items


def parse_answer(answer: str) -> str:
    """MME's reading: "yes" / "no" exactly, else "yes" or "no" within the first four characters, else "other"."""
    text = answer.strip().lower()
    if text in ANSWERS:
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def subtask_scores(items: list[BenchmarkItem], correct: list[bool]) -> dict[str, Any]:
    """acc, acc+ (both 0-100) and their sum for the items of one subtask."""
    by_image: dict[str, list[bool]] = {}
    for item, right in zip(items, correct):
        by_image.setdefault(item.meta["image_key"], []).append(right)
    acc = 100.0 * sum(correct) / max(1, len(correct))
    acc_plus = 100.0 * sum(all(rights) for rights in by_image.values()) / max(1, len(by_image))
    return {
        "acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": len(correct), "images": len(by_image),
    }


def score(items: list[BenchmarkItem], answers: list[str], show_examples: int) -> BenchmarkResult:
    correct = [parse_answer(answer) == item.reference for item, answer in zip(items, answers)]
    subtasks = sorted({item.subset for item in items})
    per_subtask = {}
    for name in subtasks:
        chosen = [index for index, item in enumerate(items) if item.subset == name]
        per_subtask[name] = subtask_scores([items[i] for i in chosen], [correct[i] for i in chosen])
    totals = {
        "perception": sum(m["score"] for name, m in per_subtask.items() if name in PERCEPTION),
        "cognition": sum(m["score"] for name, m in per_subtask.items() if name in COGNITION),
        "other": sum(m["score"] for name, m in per_subtask.items() if name not in PERCEPTION + COGNITION),
    }
    skills = {name: m["score"] / 200.0 for name, m in per_subtask.items()}  # [0, 1] for the EvalReport contract
    report = make_report(
        items, answers, [float(c) for c in correct], skills=skills, overall=sum(skills.values()) / max(1, len(skills)),
        chance=dict.fromkeys(subtasks, 0.375),  # guessing: acc 50, acc+ 25 with two questions per image
        show_examples=show_examples,
    )
    return BenchmarkResult(report=report, metrics={"format": "mme", "totals": totals, "subtasks": per_subtask})
