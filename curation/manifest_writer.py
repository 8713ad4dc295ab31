"""Write ``manifest.parquet``: one row per kept record with its lineage (schema: :mod:`vlm_core.data.manifest`)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import CurateConfig
from curation.stages.mixture import approximate_tokens
from vlm_core.data.manifest import COLUMNS, METADATA_KEY

if TYPE_CHECKING:
    from curation.pipeline import CurationResult


def _column(result: CurationResult, stage: str, name: str) -> dict[int, float]:
    """Global item index → the value of column ``name`` of ``stage`` (empty when the stage did not set it)."""
    for stage_result, inputs in result.stages:
        if stage_result.stage == stage and name in stage_result.columns:
            return dict(zip(inputs.tolist(), stage_result.columns[name].tolist()))
    return {}


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


def write_manifest(result: CurationResult, cfg: CurateConfig, path: Path) -> Path:
    """Write the kept items of ``result`` (in input order) with their weights and stage annotations."""
    clusters = _column(result, "semantic", "cluster")
    similarity = _column(result, "semantic", "max_similarity")
    alignment = _column(result, "quality", "alignment_z")
    keep_probability = _column(result, "balance", "keep_probability")
    rows: dict[str, list] = {name: [] for name in COLUMNS}
    for index, weight in zip(result.kept.tolist(), result.weights.tolist()):
        item = result.items[index]
        sample = item.sample
        decisions = {
            "exact": "kept", "near": "kept",
            "semantic": {"cluster": clusters.get(index), "max_similarity": _finite(similarity.get(index))},
            "quality": {"alignment_z": _finite(alignment.get(index, float("nan")))},
            "balance": {"keep_probability": _finite(keep_probability.get(index, 1.0))},
            "mixture": {"weight": weight},
        }
        rows["uid"].append(item.uid)
        rows["id"].append(sample.id)
        rows["source"].append(item.source)
        rows["images"].append([str(p) for p in sample.image_paths])
        rows["conversations"].append(json.dumps([{"role": t.role, "text": t.text} for t in sample.turns],
                                                ensure_ascii=False))
        rows["skill"].append(sample.skill)
        rows["meta"].append(json.dumps(sample.meta, ensure_ascii=False, default=str))
        rows["weight"].append(float(weight))
        rows["cluster"].append(int(clusters.get(index, -1)))
        rows["alignment_z"].append(float(alignment.get(index, float("nan"))))
        rows["keep_probability"].append(float(keep_probability.get(index, 1.0)))
        rows["decisions"].append(json.dumps(decisions))
        rows["tokens"].append(approximate_tokens(item.text))
        rows["config_hash"].append(result.config_hash)
    schema = pa.schema([
        ("uid", pa.string()), ("id", pa.string()), ("source", pa.string()), ("images", pa.list_(pa.string())),
        ("conversations", pa.string()), ("skill", pa.string()), ("meta", pa.string()), ("weight", pa.float64()),
        ("cluster", pa.int64()), ("alignment_z", pa.float32()), ("keep_probability", pa.float32()),
        ("decisions", pa.string()), ("tokens", pa.int64()), ("config_hash", pa.string()),
    ])
    world = next((s for s in cfg.sources.values() if s.kind in ("world", "dirty_world")), None)
    metadata = {
        "config_hash": result.config_hash,
        "mixture_seed": cfg.mixture.seed,
        "sources": {s.name: s.lineage for s in result.sources},
        "world": asdict(world.world) if world is not None else None,
        "scenes": [s.lineage["scenes"] for s in result.sources if "scenes" in s.lineage],
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    table = pa.Table.from_pydict(rows, schema=schema).replace_schema_metadata({METADATA_KEY: json.dumps(metadata)})
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, staging)
    os.replace(staging, path)
    return path


