"""What every benchmark format shares: the item type, the error type, and safe reading of files and images."""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_core.data.errors import DataError
from vlm_core.data.image import PIL_DECODE_ERRORS
from vlm_core.types import EvalReport


class FormatError(DataError):
    """A benchmark file that cannot be read; the message names the file, the line and the field."""

    def __init__(self, path: Path | str, line: int | None, field_name: str | None, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        what = f" field {field_name!r}:" if field_name else ""
        super().__init__(f"{where}:{what} {problem}")
        self.path, self.line, self.field = Path(path), line, field_name


@dataclass(frozen=True)
class BenchmarkItem:
    """One prompt of a benchmark: an image and a question, with what scoring needs.

    ``image`` is a path inside the benchmark's image folder, or the encoded bytes of an image that the
    file carries inline (MMBench's base64). ``question`` is the text without ``<image>`` and without
    the prompt suffix. ``reference`` is format-specific (a yes/no label, an option letter, answers).
    """

    id: str  # unique within the benchmark (an MMBench rotation is "index@rotation")
    question: str
    image: Path | bytes
    subset: str  # the category or subtask scores are broken down by
    reference: Any
    source: str  # "file:line", for error messages
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchmarkResult:
    """Scores of one benchmark run: ``report`` in the EvalReport contract (skills = subsets, in [0, 1]),
    ``metrics`` the format's own numbers (POPE's F1, MME's 0-200 scores, ...) for ``eval_<format>.json``."""

    report: EvalReport
    metrics: dict[str, Any]


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file (a JSON list is accepted too)."""
    if not path.is_file():
        raise FormatError(path, None, None, "file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # a JSON list, one record per element
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FormatError(path, exc.lineno, None, f"invalid JSON ({exc.msg})") from exc
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise FormatError(path, None, None, f"element {index} is {type(record).__name__}, expected an object")
            yield index + 1, record
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FormatError(path, number, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise FormatError(path, number, None, f"line holds a {type(record).__name__}, expected a JSON object")
        yield number, record


def question_records(
    questions: Path, images: Path | None, benchmark: str
) -> Iterator[tuple[int, dict[str, Any], str, Path]]:
    """(line, record, question id, image path) for every question of a JSONL benchmark file with image paths.

    FormatError when ``images`` is not given, a ``question_id`` (or ``id``) repeats, an image is missing or
    outside ``images``, or the file has no questions."""
    if images is None:
        raise FormatError(questions, None, None, f"{benchmark} needs the image folder (eval.images / --images)")
    seen: set[str] = set()
    for line, record in read_jsonl(questions):
        question_id = str(required(record, ("question_id", "id"), questions, line))
        if question_id in seen:
            raise FormatError(questions, line, "question_id", f"{question_id!r} appears twice")
        seen.add(question_id)
        yield line, record, question_id, image_in_folder(images, str(required(record, ("image",), questions, line)),
                                                          questions, line)
    if not seen:
        raise FormatError(questions, None, None, "no questions in the file")


def required(record: dict[str, Any], names: tuple[str, ...], path: Path, line: int) -> Any:
    """The value of the first of ``names`` present and non-empty in ``record``; FormatError naming them if none."""
    for name in names:
        value = record.get(name)
        if value is not None and value != "":
            return value
    wanted = " or ".join(repr(name) for name in names)
    raise FormatError(path, line, names[0], f"missing (expected {wanted}; the record has {sorted(record)})")


def image_in_folder(root: Path, relative: str, path: Path, line: int, field_name: str = "image") -> Path:
    """``root / relative``, checked to exist and to stay inside ``root`` (no ``..`` or absolute escapes)."""
    root = root.resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root):
        raise FormatError(path, line, field_name, f"{relative!r} points outside the image folder {root}")
    if not candidate.is_file():
        raise FormatError(path, line, field_name, f"image {candidate} not found in the image folder {root}")
    return candidate


def decode_base64_image(text: str, path: Path, line: int, field_name: str = "image") -> bytes:
    """The bytes of a base64-encoded image, checked to be base64 and an image PIL can read."""
    if not text.strip():
        raise FormatError(path, line, field_name, "empty (expected a base64-encoded image)")
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError(path, line, field_name, f"not valid base64 ({exc})") from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except PIL_DECODE_ERRORS as exc:
        problem = f"base64 decodes to {len(data)} bytes that are not an image ({exc})"
        raise FormatError(path, line, field_name, problem) from exc
    return data


def open_image(image: Path | bytes) -> Image.Image:
    """A PIL image of a BenchmarkItem's ``image`` (the caller closes it)."""
    return Image.open(io.BytesIO(image)) if isinstance(image, bytes) else Image.open(image)


def limit_per_subset(items: list[BenchmarkItem], limit: int | None, group: str | None = None) -> list[BenchmarkItem]:
    """At most ``limit`` items per subset, in file order (None = all).

    With ``group``, at most ``limit`` groups per subset instead, a group being the items that share
    ``meta[group]`` (an MME image's questions, an MMBench question's rotations), each kept whole.
    """
    if limit is None:
        return items
    kept_groups: dict[str, set[Any]] = {}
    kept = []
    for item in items:
        groups = kept_groups.setdefault(item.subset, set())
        key = item.meta[group] if group is not None else item.id  # ids are unique within a benchmark
        if key not in groups and len(groups) < limit:
            groups.add(key)
        if key in groups:
            kept.append(item)
    return kept


def make_report(
    items: list[BenchmarkItem], answers: list[str], scores: list[float], skills: dict[str, float], overall: float,
    chance: dict[str, float], show_examples: int, counts: dict[str, int] | None = None,
) -> EvalReport:
    """An EvalReport whose skills are the benchmark's subsets; ``predictions`` holds every item.

    ``counts`` (questions per subset) defaults to the items per subset.
    """
    predictions = [
        {"id": item.id, "skill": item.subset, "question": item.question, "answer": answer,
         "reference": item.reference, "score": score}
        for item, answer, score in zip(items, answers, scores)
    ]
    shown: dict[str, int] = {}
    examples = []
    for row in predictions:
        if shown.get(row["skill"], 0) < show_examples:
            shown[row["skill"]] = shown.get(row["skill"], 0) + 1
            examples.append(row)
    if counts is None:
        counts = {}
        for item in items:
            counts[item.subset] = counts.get(item.subset, 0) + 1
    return EvalReport(
        overall=overall, skills=dict(sorted(skills.items())), counts=dict(sorted(counts.items())),
        chance={k: v for k, v in sorted(chance.items()) if k in skills}, examples=examples, predictions=predictions,
    )
