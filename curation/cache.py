"""A content-addressed store of per-key arrays on disk (image facts, embeddings): the caching edge.

Rows are keyed by a content hash (of an image's bytes, of a text), so a cached row is valid for any
record, file name or run that has the same content. Each :meth:`ArrayStore.put` writes one ``.npz``
chunk atomically (temporary name, then rename), so a run killed half-way keeps every finished chunk and
the next run computes only what is missing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["ArrayStore", "atomic_savez"]


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` to ``path`` through a name of this writer's own, then a rename: a reader never sees half a
    file, and jobs writing the same path at once (the shards of one curation run) do not collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp.npz")
    try:
        np.savez(staging, **arrays)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


class ArrayStore:
    """Rows of named arrays keyed by string, persisted as chunks under ``directory``."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory).expanduser()
        self._index: dict[str, tuple[int, int]] = {}  # key → (chunk number, row)
        self._chunks: list[dict[str, np.ndarray]] = []
        if self.directory.is_dir():
            for path in sorted(self.directory.glob("chunk-*.npz")):
                self._add_chunk(dict(np.load(path, allow_pickle=False)))

    def _add_chunk(self, chunk: dict[str, np.ndarray]) -> None:
        number = len(self._chunks)
        self._chunks.append(chunk)
        for row, key in enumerate(chunk["keys"].tolist()):
            self._index[key] = (number, row)

    @property
    def chunks(self) -> list[dict[str, np.ndarray]]:
        """Every stored chunk (``keys`` and the named arrays), in load order."""
        return list(self._chunks)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys without a stored row, each once, in first-seen order."""
        return list(dict.fromkeys(key for key in keys if key not in self._index))

    def get(self, keys: Sequence[str], name: str) -> np.ndarray:
        """Array ``name`` for ``keys``, stacked in order. Every key must be stored (see :meth:`missing`)."""
        absent = [key for key in keys if key not in self._index]
        if absent:
            raise KeyError(f"{len(absent)} key(s) not in the store {self.directory}, e.g. {absent[0]!r}")
        rows = [self._chunks[c][name][r] for c, r in (self._index[key] for key in keys)]
        if not rows:
            return np.zeros((0,), dtype=np.float32)
        return np.stack(rows)

    def put(self, keys: Sequence[str], arrays: dict[str, np.ndarray]) -> None:
        """Store one chunk: ``arrays[name][i]`` is the value of ``keys[i]``. Written atomically."""
        if not keys:
            return
        for name, values in arrays.items():
            if len(values) != len(keys):
                raise ValueError(f"array {name!r} has {len(values)} rows for {len(keys)} keys")
        chunk = {"keys": np.asarray(list(keys)), **{name: np.asarray(v) for name, v in arrays.items()}}
        atomic_savez(self.directory / f"chunk-{uuid.uuid4().hex}.npz", chunk)
        self._add_chunk(chunk)
