"""LLaVA JSON / JSONL records, read so that one bad record (bad JSON, bad bytes) never costs the file.

The LLaVA loader of the training path (:mod:`vlm_core.data.llava`) refuses a file that is not UTF-8 as a
whole. Curation instead reads the bytes with ``surrogateescape``, so each invalid byte becomes a lone
surrogate in the string it belongs to, and quarantines just the records that hold one. The per-record
checks themselves are the loader's (:func:`vlm_core.data.llava.validate_records`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm_core.data import llava

__all__ = ["non_utf8_field", "read_records"]

_SURROGATE = re.compile("[\ud800-\udfff]")

Parsed = tuple[int, Any, "str | None"]  # (index in the file, record or None, reason when it could not be parsed)


def read_records(path: Path) -> Iterator[Parsed]:
    """Yield ``(index, record, parse_error)`` for a JSON list (``.json``) or one object per line (``.jsonl``).

    The loader's reader (:func:`vlm_core.data.llava.read_records`), except that a record holding bytes that
    are not UTF-8 is yielded with a ``parse_error`` naming the field. Raises ``DataError`` only for a file
    that cannot be read at all: missing, invalid JSON in a ``.json`` list, or a top-level value that is not
    a list.
    """
    return llava.read_records(path, record_error=_utf8_error)


def non_utf8_field(value: Any, where: str = "") -> str | None:
    """The path of the first string in ``value`` (keys included) holding a byte that was not UTF-8, else None."""
    if isinstance(value, str):
        return where or "value" if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and _SURROGATE.search(key):
                return inner
            found = non_utf8_field(item, inner)
            if found:
                return found
    if isinstance(value, list):
        for k, item in enumerate(value):
            found = non_utf8_field(item, f"{where}[{k}]")
            if found:
                return found
    return None


def _utf8_error(record: Any, where: str) -> str | None:
    field = non_utf8_field(record)
    if field is None:
        return None
    return f"{field}: not valid UTF-8 ({where} holds a byte sequence that does not decode); re-save the source as UTF-8"
