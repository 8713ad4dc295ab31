"""Read a curated ``manifest.parquet`` (written by ``curate.py``) into ``Sample``s, honouring fractional weights.

One row per kept record. Columns (the contract between curation and training):

    uid          string   "<source>/<record id>", unique
    id           string   the record's id in its source
    source       string   the source's name in the curation config (what mixture.weights names)
    images       list<string>  absolute image paths, checked inside their image root at curation
    conversations string  JSON list of {"role": "user"|"assistant", "text": ...}
    skill        string   or null
    meta         string   JSON object
    weight       double   the source's mixture weight (a repetition factor)
    cluster      int64    semantic cluster, -1 without one
    alignment_z  float    image-text alignment z-score, NaN without one
    keep_probability float  the balancing stage's keep probability
    decisions    string   JSON {stage: what the stage recorded about this row}
    tokens       int64    approximate text tokens
    config_hash  string   the hash of the curation config that made the row

The file's schema metadata ``vlm_curation`` holds the run's config hash, mixture seed and the lineage of every
source (for the built-in world: its config, so that training can evaluate on the world's held-out split).

A weight is a repetition factor: 0.3 keeps a seeded 30% of the source's rows, 2.5 gives two full copies and
a seeded half (:func:`expand`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlm_core.data.errors import DataError
from vlm_core.types import Sample, Turn

__all__ = ["COLUMNS", "METADATA_KEY", "Manifest", "expand", "read_manifest"]

METADATA_KEY = b"vlm_curation"
COLUMNS: tuple[str, ...] = (
    "uid", "id", "source", "images", "conversations", "skill", "meta", "weight", "cluster", "alignment_z",
    "keep_probability", "decisions", "tokens", "config_hash",
)
REQUIRED: tuple[str, ...] = ("uid", "id", "source", "images", "conversations", "skill", "meta", "weight")


@dataclass
class Manifest:
    """The rows of a manifest as Samples, grouped by source, with each source's weight."""

    path: Path
    samples: dict[str, list[Sample]]  # source → samples, in manifest order
    weights: dict[str, float]  # source → weight written by curation
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.metadata.get("mixture_seed", 0))

    def mixture(self, overrides: dict[str, float] | None = None, seed: int | None = None) -> list[Sample]:
        """The training samples: each source expanded by its weight (``overrides`` replace written weights)."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.samples))
        if unknown:
            raise ValueError(
                f"mixture.weights names {unknown}, which are not sources of {self.path}; its sources are "
                f"{sorted(self.samples)}"
            )
        weights = {name: overrides.get(name, weight) for name, weight in self.weights.items()}
        return expand(self.samples, weights, self.seed if seed is None else seed)


def expand(samples: dict[str, list[Sample]], weights: dict[str, float], seed: int) -> list[Sample]:
    """Each source's samples ``floor(w)`` times, plus a seeded ``w - floor(w)`` share of them, in source order.

    The share is the first ``round(fraction * n)`` of a permutation drawn from ``(seed, source position)``,
    kept in manifest order; copies after the first get ids ``<id>@<k>``.
    """
    out: list[Sample] = []
    for position, (name, rows) in enumerate(samples.items()):
        weight = float(weights.get(name, 1.0))
        if not weight >= 0 or math.isinf(weight):
            raise ValueError(f"mixture weight of source {name!r} is {weight}; weights must be finite and >= 0")
        whole = int(math.floor(weight))
        for copy in range(whole):
            out += rows if copy == 0 else [dataclasses.replace(s, id=f"{s.id}@{copy}") for s in rows]
        share = round((weight - whole) * len(rows))
        if share:
            chosen = np.sort(np.random.default_rng([seed, position]).permutation(len(rows))[:share])
            suffix = f"@{whole}" if whole else ""
            out += [dataclasses.replace(rows[i], id=f"{rows[i].id}{suffix}") if suffix else rows[i] for i in chosen]
    return out


def _turns(raw: str, uid: str, path: Path) -> tuple[Turn, ...]:
    try:
        turns = tuple(Turn(role=t["role"], text=t["text"]) for t in json.loads(raw))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: row {uid}: conversations is not a JSON list of {{role, text}} ({exc})") from exc
    if not turns or any(t.role not in ("user", "assistant") for t in turns):
        raise DataError(f"{path}: row {uid}: conversations must be non-empty user/assistant turns")
    return turns


def read_manifest(path: Path | str, check_images: bool = True) -> Manifest:
    """Load ``manifest.parquet``. Raises ``DataError`` naming the file and row for anything unusable."""
    import pyarrow.parquet as pq

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; run `python curate.py` first or fix data.path")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc
    missing = [name for name in REQUIRED if name not in table.column_names]
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {missing}; re-run curate.py to rewrite it")
    raw_meta = (table.schema.metadata or {}).get(METADATA_KEY)
    metadata = json.loads(raw_meta) if raw_meta else {}
    columns = {name: table.column(name).to_pylist() for name in REQUIRED}
    samples: dict[str, list[Sample]] = {}
    weights: dict[str, float] = {}
    for row in range(table.num_rows):
        uid, source = columns["uid"][row], columns["source"][row]
        images = tuple(Path(p) for p in columns["images"][row] or [])
        if check_images:
            for image in images:
                if not image.is_file():
                    raise DataError(f"{path}: row {uid}: image {image} is missing; re-run curate.py")
        weight = float(columns["weight"][row])
        if source in weights and weights[source] != weight:
            raise DataError(f"{path}: source {source!r} has rows with weights {weights[source]} and {weight}")
        weights[source] = weight
        sample = Sample(
            id=columns["id"][row], source=source, image_paths=images,
            turns=_turns(columns["conversations"][row], uid, path), skill=columns["skill"][row],
            meta=json.loads(columns["meta"][row] or "{}"),
        )
        samples.setdefault(source, []).append(sample)
    return Manifest(path, samples, weights, metadata)
