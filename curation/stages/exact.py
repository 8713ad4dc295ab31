"""Stage 1, exact dedup: a record whose decoded pixels and normalized text both equal an earlier one's."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from curation.records import StageResult

_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower-case, whitespace collapsed and stripped: "What  is\\n it?" and "what is it?" are the same text."""
    return _SPACE.sub(" ", text).strip().lower()


def text_hash(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()


def exact_dedup(pixel_keys: Sequence[str], texts: Sequence[str], uids: Sequence[str]) -> StageResult:
    """Remove every record whose (pixel key, normalized text) pair occurred earlier; the first is kept.

    ``pixel_keys[i]`` identifies record i's images by their decoded pixels (e.g. the joined ``pixel_sha``
    of each image; "" for a text-only record), so re-encoded copies of one image share it.
    """
    if not len(pixel_keys) == len(texts) == len(uids):
        raise ValueError(f"exact_dedup: {len(pixel_keys)} pixel keys, {len(texts)} texts, {len(uids)} ids")
    first: dict[tuple[str, str], int] = {}
    removed = {}
    for i, (pixels, text) in enumerate(zip(pixel_keys, texts)):
        key = (pixels, text_hash(text))
        if key in first:
            removed[i] = f"exact duplicate of {uids[first[key]]} (same decoded pixels and normalized text)"
        else:
            first[key] = i
    return StageResult("exact", len(texts), removed, summary={"groups": len(first)})
