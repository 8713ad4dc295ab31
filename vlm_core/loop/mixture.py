"""Curate a round's increment against the pool and write the round's versioned mixture (a manifest).

Exact curation here is three pure steps over samples keyed by (scene graph, question, answer):
exact duplicates inside the increment are dropped, samples already in the pool (or an earlier increment)
are dropped, and a pool sample a verified recaption improves on is replaced. Near dedup and concept
balancing follow (:mod:`vlm_core.loop.curate_stages`); balance across categories is the sampler's plan.
The mixture is written in ``curate.py``'s manifest format (``vlm_core.data.manifest``), so
``train.py data=manifest data.path=...`` trains on any round's mixture; every row's ``decisions`` column
and the file's metadata record its lineage: the round and the generator that produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.sources.world import Scene
from curation.sources.world.oracle import normalize
from vlm_core.data.manifest import METADATA_KEY, read_manifest
from vlm_core.loop.generators import Generated
from vlm_core.types import Sample

POOL_SOURCE = "world"  # the source name of the base pool (the world's training split) in every round's mixture
SCHEMA = pa.schema([
    ("uid", pa.string()), ("id", pa.string()), ("source", pa.string()), ("images", pa.list_(pa.string())),
    ("conversations", pa.string()), ("skill", pa.string()), ("meta", pa.string()), ("weight", pa.float64()),
    ("cluster", pa.int64()), ("alignment_z", pa.float32()), ("keep_probability", pa.float32()),
    ("decisions", pa.string()), ("tokens", pa.int64()), ("config_hash", pa.string()),
])


def sample_key(sample: Sample, scene: Scene | None) -> str:
    """What makes two samples the same: the image's scene graph (or its path), the questions and the answers."""
    image = scene.key() if scene is not None else "|".join(str(p) for p in sample.image_paths)
    text = "\x1f".join(normalize(turn.text.replace("<image>", "")) for turn in sample.turns)
    return hashlib.sha1(f"{image}\x1e{text}".encode()).hexdigest()


@dataclass
class Curated:
    """The kept samples of one increment per source, and what was removed and why."""

    kept: dict[str, list[Sample]] = field(default_factory=dict)  # source → samples
    removed: Counter = field(default_factory=Counter)  # reason → count
    replaced: set[str] = field(default_factory=set)  # pool sample ids a recaption replaces
    refill_passes: int = 0  # generation passes after the first that made up for removed samples

    def merge(self, other: Curated) -> None:
        """Add another pass's kept samples and decisions to this one."""
        for source, samples in other.kept.items():
            self.kept.setdefault(source, []).extend(samples)
        self.removed.update(other.removed)
        self.replaced |= other.replaced


def curate_increment(generated: Sequence[tuple[str, Generated]], seen: set[str],
                     key_of: Callable[[Sample], str]) -> Curated:
    """Dedup each (source, Generated) against ``seen`` (pool and earlier increments, updated in place) and itself."""
    out = Curated()
    for source, batch in generated:
        kept = []
        for sample in batch.samples:
            key = key_of(sample)
            if key in seen:
                out.removed["duplicate of pool or earlier sample"] += 1
                continue
            seen.add(key)
            kept.append(sample)
            if sample.meta.get("replaces"):
                out.replaced.add(str(sample.meta["replaces"]))
        out.kept[source] = kept
    return out


def approximate_tokens(sample: Sample) -> int:
    return sum(len(turn.text.split()) for turn in sample.turns)


def sample_table(samples: Iterable[Sample], source: str, lineage: dict[str, Any], config_hash: str) -> pa.Table:
    """Manifest rows for ``samples`` of ``source``; ``lineage`` (round, generator, ...) goes into ``decisions``."""
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    decisions = json.dumps({"lineage": lineage})
    for sample in samples:
        rows["uid"].append(f"{source}/{sample.id}")
        rows["id"].append(sample.id)
        rows["source"].append(source)
        rows["images"].append([str(p) for p in sample.image_paths])
        rows["conversations"].append(json.dumps([{"role": t.role, "text": t.text} for t in sample.turns]))
        rows["skill"].append(sample.skill)
        rows["meta"].append(json.dumps(sample.meta, default=str))
        rows["weight"].append(1.0)
        rows["cluster"].append(-1)
        rows["alignment_z"].append(float("nan"))
        rows["keep_probability"].append(1.0)
        rows["decisions"].append(decisions)
        rows["tokens"].append(approximate_tokens(sample))
        rows["config_hash"].append(config_hash)
    return pa.Table.from_pydict(rows, schema=SCHEMA)


def write_table(table: pa.Table, path: Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write atomically (temporary file, then rename), with ``metadata`` under the manifest's metadata key."""
    if metadata is not None:
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, default=str)})
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, staging)
    os.replace(staging, path)
    return path


def write_mixture(parts: Sequence[tuple[Path, float]], replaced: set[str], path: Path,
                  metadata: dict[str, Any], skills: set[str] | None = None) -> dict[str, Any]:
    """Concatenate increment tables, each with its weight, drop replaced pool rows (and, given ``skills``, rows of
    other skills); return the composition."""
    tables = []
    for part, weight in parts:
        table = pq.read_table(part)
        if replaced or skills is not None:
            keep = [uid.split("/", 1)[1] not in replaced and (skills is None or skill in skills)
                    for uid, skill in zip(table.column("uid").to_pylist(), table.column("skill").to_pylist())]
            table = table.filter(pa.array(keep, pa.bool_()))
        tables.append(table.set_column(table.schema.get_field_index("weight"), "weight",
                                       pa.array([float(weight)] * table.num_rows, pa.float64())))
    merged = pa.concat_tables(tables).replace_schema_metadata(None)
    write_table(merged, path, metadata)
    return composition(merged)


def composition(table: pa.Table) -> dict[str, Any]:
    """Rows and expected training samples (rows × weight) per source and per skill."""
    sources: Counter = Counter()
    rows: Counter = Counter()
    skills: Counter = Counter()
    for source, skill, weight in zip(table.column("source").to_pylist(), table.column("skill").to_pylist(),
                                     table.column("weight").to_pylist()):
        rows[source] += 1
        sources[source] += weight
        skills[skill or "none"] += weight
    return {
        "rows": dict(rows),
        "samples_by_source": {k: round(v, 1) for k, v in sources.items()},
        "samples_by_skill": {k: round(v, 1) for k, v in sorted(skills.items())},
        "total_samples": round(sum(sources.values()), 1),
    }


def lineage_of(path: Path) -> dict[str, Any]:
    """The lineage metadata of a written mixture (which rounds and generators its sources came from)."""
    return read_manifest(path, check_images=False).metadata.get("lineage", {})
