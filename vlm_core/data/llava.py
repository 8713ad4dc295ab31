"""Read LLaVA-format conversations into validated ``Sample``s; every bad record is quarantined with its reason.

A LLaVA file is a JSON list of records, or JSONL with one record per line (chosen by the suffix:
``.jsonl`` / ``.ndjson`` are read line by line, anything else as one JSON document)::

    {"id": "000017", "image": "img/000017.png",          # or a list of paths, or absent for text-only
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "Red."}],
     "skill": "color", "meta": {...}}                       # optional extras of this project

Conventions, besides the checks listed in ``load_llava``:

- ``from`` is ``human`` or ``gpt``; ``user`` and ``assistant`` are accepted as aliases.
- A ``system`` turn is accepted only as the first turn. It is dropped from the conversation (``Turn`` has
  no system role and the chat template renders none) and kept in ``Sample.meta["system"]``.
- ``value``s are stripped of surrounding whitespace: the chat template writes every separator itself,
  and LLaVA data often carries stray newlines around ``<image>``.
- If a record has exactly one image and no ``<image>`` placeholder, ``<image>\\n`` is prepended to its
  first human turn (the original LLaVA code does the same); any other count mismatch is an error.
- Image paths are relative to ``image_root`` and must resolve (following ``..`` and symlinks) to a file
  inside it. The check is done on the path before anything is opened, so no file outside the root is read.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_core.data.errors import DataError
from vlm_core.data.image import PIL_DECODE_ERRORS
from vlm_core.data.tokenizer import CONTROL_TOKENS, IMAGE_TOKEN
from vlm_core.types import QuarantinedRecord, Sample, Turn

__all__ = [
    "ROLE_ALIASES",
    "DataError",
    "ImageCheck",
    "load_llava",
    "read_records",
    "validate_records",
    "verify_image",
    "write_quarantine",
]

ROLE_ALIASES: dict[str, str] = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_JSON_TYPE_NAMES: dict[type, str] = {
    dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null",
}


# Checks one image file that lies inside the image root; raises ``DataError`` with the reason (without the
# path, which the caller adds) when the file is not a usable image.
ImageCheck = Callable[[Path], None]


class _Rejected(Exception):
    """Internal: a record failed one check. ``reason`` starts with the field name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_llava(
    path: Path | str,
    image_root: Path | str,
    source: str | None = None,
    max_images: int = 8,
    *,
    strict: bool = False,
) -> tuple[list[Sample], list[QuarantinedRecord]]:
    """Validate every record of a LLaVA file; return the good ones as Samples and the bad ones with reasons.

    Each record is checked, in this order, and the first failure quarantines it:
    it is an object; ``id`` is a non-empty string or an integer, not seen earlier in the file (an id names
    the record in quarantine rows, so a second record with the same id is rejected even if the first was);
    ``conversations`` is a non-empty list of objects whose ``from`` is a known role and whose ``value`` is a
    non-empty string without reserved chat tokens; roles alternate, starting with human and ending with
    gpt; gpt turns hold no ``<image>``; ``skill`` is a string and ``meta`` an object when present; ``image``
    is a path string or a list of them, at most ``max_images``, matching the ``<image>`` placeholders of
    the human turns; every path is relative, stays inside ``image_root``, names an existing file, and PIL
    can open and verify it.

    ``source`` becomes ``Sample.source`` (default: the file path); ``QuarantinedRecord.source`` is always
    the file. With ``strict=True`` the first bad record raises ``DataError`` instead.

    Raises ``DataError`` for problems with the file as a whole: missing file or image root, text that is
    not UTF-8, invalid JSON (with line and column), or a JSON document that is not a list. In JSONL, a line
    that is not valid JSON is one quarantined record (``#<index>``), and the rest of the file is read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: LLaVA file not found; check the source path in the data config")
    return validate_records(
        read_records(path), str(path), image_root, source=source, max_images=max_images, strict=strict
    )


def validate_records(
    records: Iterable[tuple[int, Any, str | None]],
    file: str,
    image_root: Path | str,
    source: str | None = None,
    max_images: int = 8,
    *,
    strict: bool = False,
    check_image: ImageCheck | None = None,
) -> tuple[list[Sample], list[QuarantinedRecord]]:
    """The checks of :func:`load_llava` on already-parsed LLaVA records, for readers of other formats.

    ``records`` yields ``(index, record, parse_error)``: the record's position in ``file``, the parsed
    object, and a reason when the reader could not parse it (the record is then quarantined with it).
    ``check_image`` replaces the default image check (:func:`verify_image`); it runs only on paths that
    passed the containment checks, so it never sees a file outside ``image_root``.
    """
    if max_images < 0:
        raise ValueError(f"max_images={max_images}; must be >= 0")
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise DataError(
            f"{image_root}: image root of {file} is not a folder; "
            "point image_root at the folder the 'image' paths are relative to"
        )
    root = image_root.resolve()
    sample_source = source if source is not None else file
    check = check_image or verify_image

    samples: list[Sample] = []
    quarantined: list[QuarantinedRecord] = []
    first_index_of_id: dict[str, int] = {}
    for index, record, parse_error in records:
        label = f"#{index}"
        try:
            if parse_error is not None:
                raise _Rejected(parse_error)
            label = _record_id(record)
            if label in first_index_of_id:
                first = first_index_of_id[label]
                raise _Rejected(f"id: duplicate id {label!r}, first used by record #{first}; ids must be unique within a file")
            first_index_of_id[label] = index
            samples.append(_validate(record, label, sample_source, root, max_images, check))
        except _Rejected as rejected:
            if strict:
                raise DataError(f"{file}: record {label}: {rejected.reason}") from None
            quarantined.append(QuarantinedRecord(source=file, record=label, reason=rejected.reason))
    return samples, quarantined


def verify_image(path: Path) -> None:
    """The default image check: PIL opens the file and verifies it; raises ``DataError`` with the reason."""
    try:
        with Image.open(path) as image:
            # verify() checks the header and, for PNG, every chunk's CRC without decoding pixels: it catches
            # truncated and corrupt files for about the cost of reading them.
            image.verify()
    except PIL_DECODE_ERRORS as exc:
        raise DataError(f"is not a readable image ({type(exc).__name__}: {exc})") from None


def write_quarantine(records: Iterable[QuarantinedRecord], path: Path | str) -> Path:
    """Write ``quarantine.jsonl``: one ``{"source", "record", "reason"}`` object per line, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for record in records:
                row = {"source": record.source, "record": record.record, "reason": record.reason}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(staging, 0o644)  # mkstemp creates 0o600; the report is meant to be read by others
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


# Checks one parsed record; ``where`` is "line <n>" (JSONL) or "record #<i>" (a JSON list). Returns the reason
# to quarantine it, or None.
RecordCheck = Callable[[Any, str], str | None]


def read_records(path: Path, record_error: RecordCheck | None = None) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(index, record, parse_error)``; ``parse_error`` is set (and record None) for a broken JSONL line.

    Without ``record_error`` a file that is not UTF-8 raises ``DataError`` as a whole. With it, the bytes are
    decoded with ``surrogateescape`` (each invalid byte becomes a lone surrogate in the string it belongs to)
    and every parsed record is passed to ``record_error``, whose reason becomes its ``parse_error``: curation
    uses this to quarantine just the records that hold such a byte.
    """
    try:
        if record_error is None:
            text = path.read_text(encoding="utf-8")
        else:
            text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); re-save the file as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read the source file ({exc}); check the source's path") from exc

    def check(record: Any, where: str) -> str | None:
        return record_error(record, where) if record_error is not None else None

    if path.suffix.lower() in _JSONL_SUFFIXES:
        index = 0
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, say) are not records
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                reason = f"line {line_number}, column {exc.colno}: invalid JSON ({exc.msg}); fix or delete the line"
                yield index, None, reason
            else:
                yield index, record, check(record, f"line {line_number}")
            index += 1
        return
    # A file of objects one per line, named .json, is a common mix-up; say so rather than only "Extra data".
    hint = " (it looks like JSONL, one object per line: name it .jsonl)" if text.lstrip().startswith("{") else ""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{hint}; fix the file, "
            "or write one record per line as .jsonl so that a broken record costs one line, not the file"
        ) from exc
    if not isinstance(document, list):
        raise DataError(
            f"{path}: expected a JSON list of records at the top level, got {_json_type(document)}{hint}; "
            "wrap the records in [...] or write them one per line as .jsonl"
        )
    for index, record in enumerate(document):
        yield index, record, check(record, f"record #{index}")


def _record_id(record: Any) -> str:
    if not isinstance(record, dict):
        raise _Rejected(f"record: expected a JSON object, got {_json_type(record)}")
    if "id" not in record:
        raise _Rejected("id: missing; every record needs a unique string or integer id")
    raw = record["id"]
    # bool is an int subclass, but True is not an id anyone meant.
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise _Rejected(f"id: expected a string or integer, got {_json_type(raw)}")
    label = str(raw).strip()
    if not label:
        raise _Rejected("id: empty; every record needs a unique non-empty id")
    return label


def _validate(
    record: dict[str, Any], label: str, source: str, root: Path, max_images: int, check_image: ImageCheck
) -> Sample:
    turns, system = _conversation(record)
    skill = record.get("skill")
    if skill is not None and (not isinstance(skill, str) or not skill.strip()):
        raise _Rejected(f"skill: expected a non-empty string, got {_json_type(skill)} {skill!r}")
    meta = record.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise _Rejected(f"meta: expected a JSON object, got {_json_type(meta)}")
    meta = dict(meta or {})
    if system is not None:
        meta["system"] = system

    relative_paths, fields = _image_paths(record)
    if len(relative_paths) > max_images:
        raise _Rejected(
            f"image: {len(relative_paths)} images, more than max_images={max_images}; raise max_images or split the record"
        )
    placeholders = sum(turn.text.count(IMAGE_TOKEN) for turn in turns if turn.role == "user")
    if placeholders != len(relative_paths):
        if len(relative_paths) == 1 and placeholders == 0:
            turns[0] = Turn(role="user", text=f"{IMAGE_TOKEN}\n{turns[0].text}")
        else:
            raise _Rejected(
                f"conversations: {placeholders} {IMAGE_TOKEN} placeholder(s) in human turns but 'image' lists "
                f"{len(relative_paths)} image(s); put one {IMAGE_TOKEN} where each image belongs"
            )
    image_paths = tuple(
        _checked_image(root, relative, field, check_image) for relative, field in zip(relative_paths, fields)
    )
    return Sample(
        id=label,
        source=source,
        image_paths=image_paths,
        turns=tuple(turns),
        skill=skill.strip() if skill is not None else None,
        meta=meta,
    )


def _conversation(record: dict[str, Any]) -> tuple[list[Turn], str | None]:
    """Turns of ``conversations`` (a leading system turn dropped) and the system text, if any."""
    if "conversations" not in record:
        raise _Rejected("conversations: missing; expected a list of {from, value} turns")
    conversation = record["conversations"]
    if not isinstance(conversation, list):
        raise _Rejected(f"conversations: expected a list of turns, got {_json_type(conversation)}")
    if not conversation:
        raise _Rejected("conversations: empty; need at least one human turn and one gpt turn")
    turns: list[Turn] = []
    last_index = 0  # index in the record of the last kept turn, for the "ends with human" message
    system: str | None = None
    for i, turn in enumerate(conversation):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise _Rejected(f"{field}: expected an object with 'from' and 'value', got {_json_type(turn)}")
        if "from" not in turn:
            raise _Rejected(f"{field}.from: missing; expected human or gpt")
        speaker = turn["from"]
        if speaker == "system" and i == 0:
            role = "system"
        elif speaker == "system":
            raise _Rejected(f"{field}.from: 'system' is only accepted as the first turn (conversations[0])")
        elif not isinstance(speaker, str) or speaker not in ROLE_ALIASES:
            raise _Rejected(f"{field}.from: unknown role {speaker!r} (expected human/gpt)")
        else:
            role = ROLE_ALIASES[speaker]
        text = _turn_text(turn, field)
        if role == "system":
            system = text
            continue
        if role == "assistant" and IMAGE_TOKEN in text:
            raise _Rejected(f"{field}.value: {IMAGE_TOKEN} placeholder in a gpt turn; images belong in human turns")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            wanted = "human" if expected == "user" else "gpt"
            raise _Rejected(
                f"{field}.from: got {speaker!r} where {wanted!r} was expected; "
                "turns must alternate human/gpt, starting with human"
            )
        turns.append(Turn(role=role, text=text))
        last_index = i
    if not turns:
        raise _Rejected("conversations: only a system turn; need at least one human turn and one gpt turn")
    if turns[-1].role != "assistant":
        raise _Rejected(
            f"conversations[{last_index}].from: the conversation ends with a human turn; "
            "the last turn must be gpt (the answer to train on)"
        )
    return turns, system


def _turn_text(turn: dict[str, Any], field: str) -> str:
    if "value" not in turn:
        raise _Rejected(f"{field}.value: missing; expected the turn's text")
    value = turn["value"]
    if not isinstance(value, str):
        raise _Rejected(f"{field}.value: expected a string, got {_json_type(value)}")
    text = value.strip()
    if not text:
        raise _Rejected(f"{field}.value: empty (only whitespace)")
    for token in CONTROL_TOKENS:
        if token in text:
            raise _Rejected(
                f"{field}.value: contains the reserved chat token {token!r}, which would forge a turn boundary; "
                "remove it from the text"
            )
    return text


def _image_paths(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The relative paths of ``image`` and the field name of each (for messages); absent or null: none."""
    raw = record.get("image")
    if raw is None:
        return [], []
    if isinstance(raw, str):
        entries = [raw]
    elif isinstance(raw, list):
        entries = raw
    else:
        raise _Rejected(f"image: expected a path string or a list of path strings, got {_json_type(raw)}")
    fields = ["image"] if isinstance(raw, str) else [f"image[{k}]" for k in range(len(entries))]
    for field, entry in zip(fields, entries):
        if not isinstance(entry, str):
            raise _Rejected(f"{field}: expected a path string, got {_json_type(entry)}")
        if not entry.strip():
            raise _Rejected(f"{field}: empty path")
    return list(entries), fields


def _checked_image(root: Path, relative: str, field: str, check_image: ImageCheck) -> Path:
    """Resolve ``relative`` under ``root`` and refuse anything outside it, before any file is opened."""
    if "\x00" in relative:
        raise _Rejected(f"{field}: path contains a NUL byte")
    relative_path = Path(relative)
    if relative_path.is_absolute():
        raise _Rejected(f"{field}: absolute path {relative!r}; paths must be relative to the image root")
    # resolve() follows '..' and symlinks without opening the target, so the containment check below
    # runs before any byte of a file outside the root could be read.
    resolved = (root / relative_path).resolve()
    if not resolved.is_relative_to(root):
        how = "'..'" if ".." in relative_path.parts else "a symlink"
        raise _Rejected(
            f"{field}: {relative!r} resolves to {resolved}, outside the image root {root} (via {how}); refused"
        )
    if not resolved.exists():
        raise _Rejected(f"{field}: {relative!r} not found under the image root {root}")
    if not resolved.is_file():
        raise _Rejected(f"{field}: {relative!r} is not a file")
    try:
        check_image(resolved)
    except DataError as exc:
        raise _Rejected(f"{field}: {relative!r} {exc}") from None
    return resolved


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages about JSON data."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
