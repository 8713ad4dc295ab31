"""The curation run: ingest → exact → near → semantic → quality → balance → mixture → outputs.

This module is the I/O edge around the pure stages: it builds their input arrays from the items, saves each
stage's result under ``<output_dir>/stages/`` keyed by a hash of the stage's config and inputs (a rerun,
or a run killed half-way, reuses every finished stage), caches embeddings by content hash, checks the
accounting identity, and writes:

    manifest.parquet   one row per kept record with its lineage (see vlm_core.data.manifest)
    quarantine.jsonl   {"source", "record", "reason"} per record that failed validation
    removed.jsonl      {"source", "record", "uid", "stage", "reason"} per record a stage removed
    report.json        counts in/out per stage and per source (and recall per planted class, for the dirty world)
    report.md          the same with plots (cluster sizes, skill/concept distribution before and after, duplicates)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curation.cache import atomic_savez
from curation.config import CurateConfig
from curation.embed import Embedder, joint
from curation.ingest import IngestedSource, ingest
from curation.records import THUMB, Item, StageResult, skipped
from curation.semantic_shards import load_or_cluster, merged_search, pairs_path, search_settings, search_shards
from curation.stages.balance import balance, concept_tags
from curation.stages.exact import exact_dedup, text_hash
from curation.stages.mixture import approximate_tokens, mixture_weights
from curation.stages.near import minhashes, near_dedup
from curation.stages.quality import alignment_scores, quality_filter, robust_z
from curation.stages.semantic import Clusters, semantic_dedup, use_gpu
from vlm_core.data.llava import write_quarantine
from vlm_core.types import QuarantinedRecord

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("exact", "near", "semantic", "quality", "balance", "mixture")
STAGE_FORMAT = 1  # bump when the saved stage files change


class AccountingError(RuntimeError):
    """ingested != kept + quarantined + removed: a record was lost or counted twice (a bug, never data)."""


@dataclass
class CurationResult:
    """What a run produced: the items, who removed what, and the output paths."""

    items: list[Item]
    sources: list[IngestedSource]
    stages: list[tuple[StageResult, np.ndarray]]  # each stage's result and the global indices of its inputs
    kept: np.ndarray  # global indices of the kept items
    weights: np.ndarray  # [len(kept)] mixture weight of each kept item
    config_hash: str
    output_dir: Path
    report: dict[str, Any] = field(default_factory=dict)
    embeddings: dict[str, str] = field(default_factory=dict)  # which image and text embedders ran (cache namespaces)

    @property
    def quarantined(self) -> list[QuarantinedRecord]:
        return [q for source in self.sources for q in source.quarantined]

    def removed_by(self) -> dict[int, tuple[str, str]]:
        """Global item index → (stage, reason) for every removed item."""
        out = {}
        for result, inputs in self.stages:
            for local, reason in result.removed.items():
                out[int(inputs[local])] = (result.stage, reason)
        return out


def config_hash(cfg: CurateConfig) -> str:
    """12 hex digits identifying what the run computes (paths to outputs and display settings excluded)."""
    data = asdict(cfg)
    for key in ("output_dir", "show_progress", "resume", "cache_dir"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageCache:
    """Saves each stage's result as ``<dir>/<stage>.npz`` with the key of its inputs; loads it back on a match."""

    def __init__(self, directory: Path, resume: bool) -> None:
        self.directory = directory
        self.resume = resume

    def run(self, name: str, key: str, compute: Callable[[], StageResult]) -> StageResult:
        path = self.directory / f"{name}.npz"
        if self.resume and path.is_file():
            with np.load(path, allow_pickle=False) as saved:
                if str(saved["key"]) == key:
                    log.info("stage %s: reusing the result saved in %s", name, path)
                    columns = {k[len("column_"):]: saved[k] for k in saved.files if k.startswith("column_")}
                    removed = dict(zip(saved["removed_index"].tolist(), saved["removed_reason"].tolist()))
                    return StageResult(name, int(saved["n"]), removed, columns, json.loads(str(saved["summary"])))
        result = compute()
        arrays = {
            "key": np.array(key), "n": np.array(result.n), "summary": np.array(json.dumps(result.summary)),
            "removed_index": np.array(sorted(result.removed), dtype=np.int64),
            "removed_reason": np.array([result.removed[i] for i in sorted(result.removed)], dtype=str),
            **{f"column_{k}": np.asarray(v) for k, v in result.columns.items()},
        }
        atomic_savez(path, arrays)
        return result


def _world_tower(cfg: CurateConfig, sources: list[IngestedSource]) -> Path | None:
    """The cached stage-0 tower of this run's world (or of the default world), if ``train.py`` made one."""
    hashes = [s.lineage["world_hash"] for s in sources if "world_hash" in s.lineage]
    if not hashes:
        return None
    from curation.sources.world.config import WorldConfig
    from curation.sources.world.writer import config_hash as world_hash
    from vlm_core.config import TowerStageConfig
    from vlm_core.model.config import VisionConfig
    from vlm_core.train.tower import tower_cache_key

    towers = Path(cfg.cache_dir).expanduser() / "towers"
    for digest in [*hashes, world_hash(WorldConfig())]:
        folder = towers / tower_cache_key(VisionConfig(), digest, TowerStageConfig(), 0)
        if (folder / "vision.safetensors").is_file():
            return folder
    return None


@dataclass
class ShardResult:
    """What a run with ``semantic.shard`` set did: one shard of the semantic search, saved in ``path``."""

    shard: int
    shards: int
    pairs: int
    path: Path


def run_curation(cfg: CurateConfig) -> CurationResult | ShardResult:
    """Run every stage of ``cfg`` and write the outputs into ``cfg.output_dir``.

    With ``semantic.shard`` set, stop after that shard of the semantic search (see curation/semantic_shards.py)."""
    output = Path(cfg.output_dir).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    digest = config_hash(cfg)
    sources = ingest(cfg)
    items = [item for source in sources for item in source.items]
    uids = [item.uid for item in items]
    duplicates = [uid for uid, count in Counter(uids).items() if count > 1]
    if duplicates:
        raise ValueError(f"two records share the id {duplicates[0]!r} within one source; ids must be unique")
    texts = [item.text for item in items]
    content = [_digest(item.uid, text_hash(text), [f.pixel_sha for f in item.images]) for item, text in zip(items, texts)]
    cache = StageCache(output / "stages", cfg.resume)
    show = cfg.show_progress
    stages: list[tuple[StageResult, np.ndarray]] = []
    alive = np.arange(len(items))

    def step(name: str, settings: Any, compute: Callable[[np.ndarray], StageResult], extra: Any = None) -> None:
        nonlocal alive
        key = _digest(STAGE_FORMAT, name, asdict(settings), extra, [content[i] for i in alive])
        inputs = alive.copy()
        enabled = getattr(settings, "enabled", True)
        result = cache.run(name, key, (lambda: compute(inputs)) if enabled else (lambda: skipped(name, len(inputs))))
        stages.append((result, inputs))
        alive = inputs[result.keep]
        log.info("stage %s: %d in, %d removed, %d out", name, len(inputs), len(result.removed), len(alive))

    def exact(rows: np.ndarray) -> StageResult:
        keys = ["|".join(f.pixel_sha for f in items[i].images) for i in rows]
        return exact_dedup(keys, [texts[i] for i in rows], [uids[i] for i in rows])

    def near(rows: np.ndarray) -> StageResult:
        has_image = np.array([bool(items[i].images) for i in rows], dtype=bool)
        phashes = np.array([items[i].images[0].phash if items[i].images else (0, 0, 0) for i in rows], dtype=np.uint64)
        blank = np.zeros((THUMB, THUMB, 3), dtype=np.uint8)
        thumbs = np.stack([items[i].images[0].thumb if items[i].images else blank for i in rows]) if len(rows) else \
            np.zeros((0, THUMB, THUMB, 3), dtype=np.uint8)
        signatures = minhashes([texts[i] for i in rows], cfg.near, show)
        return near_dedup(phashes, thumbs, has_image, signatures, [uids[i] for i in rows], cfg.near, show)

    step("exact", cfg.exact, exact)
    step("near", cfg.near, near)

    embedder = Embedder(cfg.embed, Path(cfg.cache_dir), _world_tower(cfg, sources), show)
    needs_embeddings = cfg.semantic.enabled or (cfg.quality.enabled and cfg.quality.alignment)
    image_embeddings: dict[int, np.ndarray] = {}
    text_embeddings: dict[int, np.ndarray] = {}
    embed_ids = None
    if needs_embeddings:
        embed_ids = (embedder.image_id(), embedder.text_id())
        rows = alive
        image_matrix = embedder.images([items[i] for i in rows])
        text_matrix = embedder.texts([texts[i] for i in rows])
        image_embeddings = {int(i): image_matrix[k] for k, i in enumerate(rows)}
        text_embeddings = {int(i): text_matrix[k] for k, i in enumerate(rows)}

    def semantic_input(rows: np.ndarray) -> np.ndarray:
        images = np.stack([image_embeddings[int(i)] for i in rows])
        words = np.stack([text_embeddings[int(i)] for i in rows])
        x = {"joint": lambda: joint(images, words), "image": lambda: images, "text": lambda: words}[cfg.semantic.modality]()
        return np.ascontiguousarray(x, dtype=np.float32)

    def search_key(rows: np.ndarray) -> str:  # what the clustering and every shard's pairs are computed from
        return _digest(STAGE_FORMAT, "semantic-search", search_settings(cfg.semantic), embed_ids,
                       [content[i] for i in rows])  # fmt: skip

    def sharded(rows: np.ndarray) -> tuple[np.ndarray, bool, str, Clusters]:
        """(x, gpu, search key, clustering) of a sharded run: the clustering done once for every shard."""
        x, gpu, key = semantic_input(rows), use_gpu(), search_key(rows)
        return x, gpu, key, load_or_cluster(cache.directory, key, x, cfg.semantic, gpu)

    def semantic(rows: np.ndarray) -> StageResult:
        if len(rows) == 0:
            return StageResult("semantic", 0)
        if cfg.semantic.shards == 1:
            return semantic_dedup(semantic_input(rows), [uids[i] for i in rows], cfg.semantic, show)
        x, gpu, key, clusters = sharded(rows)
        pairs = merged_search(cache.directory, key, x, clusters, cfg.semantic, gpu, show)
        return semantic_dedup(x, [uids[i] for i in rows], cfg.semantic, show, gpu, clusters, pairs)

    if cfg.semantic.shard is not None:  # one shard's job: search its clusters, save them, stop
        if not cfg.semantic.enabled or len(alive) == 0:
            raise ValueError(f"semantic.shard={cfg.semantic.shard}: the semantic stage is "
                             f"{'off' if not cfg.semantic.enabled else 'empty'}; there is nothing to shard")  # fmt: skip
        x, gpu, key, clusters = sharded(alive)
        [pairs] = search_shards(cache.directory, key, x, clusters, cfg.semantic, [cfg.semantic.shard], gpu, show)
        path = pairs_path(cache.directory, cfg.semantic.shard, cfg.semantic.shards)
        log.info("semantic shard %d of %d: %d pairs saved in %s; run without semantic.shard to merge the shards",
                 cfg.semantic.shard, cfg.semantic.shards, pairs.later.size, path)
        return ShardResult(cfg.semantic.shard, cfg.semantic.shards, int(pairs.later.size), path)

    step("semantic", cfg.semantic, semantic, embed_ids)
    semantic_result, semantic_inputs = stages[-1]
    cluster_of = {}
    if "cluster" in semantic_result.columns:
        cluster_of = dict(zip(semantic_inputs.tolist(), semantic_result.columns["cluster"].tolist()))

    def quality(rows: np.ndarray) -> StageResult:
        first = [items[i].images[0] if items[i].images else None for i in rows]
        has_image = np.array([f is not None for f in first], dtype=bool)
        z = None
        if cfg.quality.alignment and len(rows):
            scores = alignment_scores(
                np.stack([image_embeddings[int(i)] for i in rows]), np.stack([text_embeddings[int(i)] for i in rows]),
                has_image, [items[i].sample.skill or "" for i in rows], cfg.quality.alignment_folds,
                cfg.quality.alignment_ridge, seed=0,
            )
            z = robust_z(scores, [items[i].sample.skill or "" for i in rows])
        return quality_filter(
            np.array([f.width if f else 0 for f in first]), np.array([f.height if f else 0 for f in first]),
            np.array([f.std if f else 0.0 for f in first]), has_image,
            np.array([items[i].assistant_chars for i in rows]), np.array([len(texts[i]) for i in rows]), z, cfg.quality,
        )

    step("quality", cfg.quality, quality, embed_ids)

    def tags_of(rows: np.ndarray) -> list[list[str]]:
        wanted = set(cfg.balance.tags)
        concepts = concept_tags([texts[i] for i in rows], cfg.balance.concepts) if "concepts" in wanted else None
        tags = []
        for k, i in enumerate(rows):
            record = []
            if "skill" in wanted and items[i].sample.skill:
                record.append(f"skill:{items[i].sample.skill}")
            if concepts is not None:
                record += concepts[k]
            if "cluster" in wanted and int(i) in cluster_of:
                record.append(f"cluster:{cluster_of[int(i)]}")
            tags.append(record)
        return tags

    if "cluster" in cfg.balance.tags and not cluster_of and cfg.balance.enabled:
        log.warning("balance.tags names cluster, but the semantic stage is off: there are no clusters to cap")
    step("balance", cfg.balance, lambda rows: balance(tags_of(rows), cfg.balance, [uids[i] for i in rows]),
         [cluster_of.get(int(i)) for i in alive] if "cluster" in cfg.balance.tags else None)

    tokens = np.array([approximate_tokens(texts[i]) for i in range(len(items))], dtype=np.int64)
    mixture_cfg = cfg.mixture
    step("mixture", mixture_cfg, lambda rows: mixture_weights([items[i].source for i in rows], tokens[rows], mixture_cfg))
    mixture_result, mixture_inputs = stages[-1]
    weights = mixture_result.columns.get("weight", np.ones(len(mixture_inputs)))

    result = CurationResult(items, sources, stages, alive, np.asarray(weights, dtype=np.float64), digest, output)
    if embed_ids is not None:
        result.embeddings = {"image": embed_ids[0], "text": embed_ids[1]}
    check_accounting(result)
    from curation.manifest_writer import write_manifest
    from curation.report import atomic_text, build_report, write_report

    write_manifest(result, cfg, output / "manifest.parquet")
    write_quarantine(result.quarantined, output / "quarantine.jsonl")
    atomic_text(output / "removed.jsonl", _removed_lines(result))
    result.report = build_report(result, cfg)
    write_report(result, cfg, output)
    return result


def check_accounting(result: CurationResult) -> dict[str, int]:
    """Raise :class:`AccountingError` unless ingested = kept + quarantined + removed, overall and per source."""
    removed = result.removed_by()
    totals = {"ingested": 0, "quarantined": 0, "removed": len(removed), "kept": len(result.kept)}
    index_of_source: dict[str, list[int]] = {}
    for i, item in enumerate(result.items):
        index_of_source.setdefault(item.source, []).append(i)
    kept = set(result.kept.tolist())
    if kept & set(removed):
        raise AccountingError(f"{len(kept & set(removed))} record(s) are both kept and removed")
    for source in result.sources:
        rows = index_of_source.get(source.name, [])
        n_kept = sum(1 for i in rows if i in kept)
        n_removed = sum(1 for i in rows if i in removed)
        if source.ingested != n_kept + n_removed + len(source.quarantined):
            raise AccountingError(
                f"source {source.name}: ingested {source.ingested} != kept {n_kept} + quarantined "
                f"{len(source.quarantined)} + removed {n_removed}"
            )
        totals["ingested"] += source.ingested
        totals["quarantined"] += len(source.quarantined)
    if totals["ingested"] != totals["kept"] + totals["quarantined"] + totals["removed"]:
        raise AccountingError(f"ingested {totals['ingested']} != kept + quarantined + removed ({totals})")
    return totals


def _removed_lines(result: CurationResult) -> str:
    """``removed.jsonl``: one {"source", "record", "uid", "stage", "reason"} object per removed record."""
    files = {s.name: s.lineage.get("file") or s.lineage.get("path") or s.name for s in result.sources}
    rows = []
    for index, (stage, reason) in sorted(result.removed_by().items()):
        item = result.items[index]
        rows.append(json.dumps({"source": files[item.source], "record": item.sample.id, "uid": item.uid,
                                "stage": stage, "reason": reason}, ensure_ascii=False))
    return "".join(row + "\n" for row in rows)
