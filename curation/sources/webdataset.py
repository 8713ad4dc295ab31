"""WebDataset tar shards → LLaVA records over images extracted into a folder of their own.

A shard holds samples as files that share a key (the member name up to the first dot of its base name):
``000017.jpg`` (or .jpeg/.png/.webp) with ``000017.json`` (a LLaVA record, a messages record, or
``{"caption": ...}``) and/or ``000017.txt`` (a caption). A caption becomes one turn pair:
"<image>\\nDescribe the image." → the caption.

Tar members are never extracted with ``tarfile``'s own extraction: only regular files whose names are
relative and stay inside the shard's folder are copied out, byte by byte. A sample with a link, a device,
an absolute name or a '..' among its members is quarantined whole, with the member named.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.sources.llava import non_utf8_field
from curation.sources.sharegpt import ShareGPTError, to_llava_record
from vlm_core.data.errors import DataError

__all__ = ["ExtractedShard", "extract_shard", "shard_records", "shards_of"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TEXT_SUFFIXES = (".json", ".txt")
CAPTION_PROMPT = "Describe the image."
EXTRACT_MARKER = "EXTRACTED"


@dataclass
class ExtractedShard:
    """A shard's samples: key → member suffix → extracted path (images) or bytes (text); and refused keys."""

    shard: Path
    folder: Path  # the image root of the shard's records
    members: dict[str, dict[str, str]] = field(default_factory=dict)  # key → {suffix: path relative to folder}
    refused: dict[str, str] = field(default_factory=dict)  # key → reason


def shards_of(path: Path) -> list[Path]:
    """``path`` itself when it is a shard, else the ``*.tar`` files of the folder, sorted."""
    if path.is_file():
        return [path]
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if shards:
            return shards
    raise DataError(f"{path}: no WebDataset shard (.tar) found; point the source's path at a shard or a folder of them")


def _split_key(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    stem, dot, rest = base.partition(".")
    return posixpath.join(directory, stem), (dot + rest).lower()


def _refusal(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if member.issym() or member.islnk():
        return f"tar member {name!r} is a link (to {member.linkname!r}); links are refused"
    if not member.isfile():
        return f"tar member {name!r} is not a regular file; refused"
    if name.startswith("/") or posixpath.isabs(name):
        return f"tar member {name!r} has an absolute name; refused"
    if ".." in name.split("/"):
        return f"tar member {name!r} climbs out of the shard with '..'; refused"
    return None


def extract_shard(shard: Path, cache_root: Path) -> ExtractedShard:
    """Copy the shard's safe regular files into ``cache_root/<sha of the shard>/`` (once; reused when complete)."""
    with shard.open("rb") as handle:  # streamed: a shard is often a gigabyte, too much to hold for a hash
        digest = hashlib.file_digest(handle, "sha256").hexdigest()[:16]
    folder = cache_root / digest
    result = ExtractedShard(shard, folder)
    index_path = folder / EXTRACT_MARKER
    if index_path.is_file():
        saved = json.loads(index_path.read_text())
        result.members, result.refused = saved["members"], saved["refused"]
        return result
    staging = cache_root / f".{digest}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(shard, "r:*") as archive:
            for member in archive:
                key, suffix = _split_key(member.name)
                reason = _refusal(member)
                if reason:
                    result.refused.setdefault(key, reason)
                    continue
                if suffix not in IMAGE_SUFFIXES + TEXT_SUFFIXES:
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    result.refused.setdefault(key, f"tar member {member.name!r} cannot be read")
                    continue
                target = staging / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                with handle, target.open("wb") as out:
                    shutil.copyfileobj(handle, out)
                result.members.setdefault(key, {})[suffix] = member.name
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{shard}: not a readable tar shard ({exc}); re-create the shard") from exc
    (staging / EXTRACT_MARKER).write_text(json.dumps({"members": result.members, "refused": result.refused}))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return result


def _caption_record(key: str, caption: str, images: list[str]) -> dict[str, Any]:
    return {
        "id": key,
        "image": images[0] if len(images) == 1 else images,
        "conversations": [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"}, {"from": "gpt", "value": caption}],
    }


def _decode(folder: Path, member: str, key: str) -> str:
    data = (folder / member).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{member}: not valid UTF-8 (bad byte at offset {exc.start}); re-save it as UTF-8") from None


def shard_records(extracted: ExtractedShard) -> Iterator[tuple[int, Any, str | None]]:
    """``(index, LLaVA record, parse_error)`` per key of the shard, for :func:`validate_records`."""
    keys = sorted(set(extracted.members) | set(extracted.refused))
    for index, key in enumerate(keys):
        if key in extracted.refused:
            yield index, {"id": key}, extracted.refused[key]
            continue
        parts = extracted.members[key]
        images = sorted(member for suffix, member in parts.items() if suffix in IMAGE_SUFFIXES)
        try:
            if ".json" in parts:
                record = json.loads(_decode(extracted.folder, parts[".json"], key))
                if isinstance(record, dict) and "messages" in record:
                    record = to_llava_record(record)
                if isinstance(record, dict) and "conversations" not in record and "caption" in record:
                    record = _caption_record(str(record.get("id", key)), record["caption"], images)
                if isinstance(record, dict):
                    record.setdefault("id", key)
                    if images:
                        record["image"] = images[0] if len(images) == 1 else images
            elif ".txt" in parts:
                record = _caption_record(key, _decode(extracted.folder, parts[".txt"], key).strip(), images)
            else:
                yield index, {"id": key}, f"sample {key!r} has no .json or .txt member; nothing to train on"
                continue
        except json.JSONDecodeError as exc:
            yield index, {"id": key}, f"{key}.json: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
            continue
        except (ValueError, ShareGPTError) as exc:
            yield index, {"id": key}, str(exc)
            continue
        bad = non_utf8_field(record)
        yield index, record, (f"{bad}: not valid UTF-8" if bad else None)
