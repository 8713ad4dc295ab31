"""Sources → validated :class:`Item` s and quarantined records; the reading edge of the pipeline.

Every record a source yields ends as exactly one of: an ``Item`` or a ``QuarantinedRecord`` with its reason,
so ``ingested = items + quarantined`` per source. The record checks are the LLaVA loader's
(:func:`vlm_core.data.llava.validate_records`: fields, roles, empty turns, ``<image>`` count, absolute
paths, ``..`` and symlinks out of the image root, missing files), with this package's image check
(:class:`curation.images.ImageInspector`: pixel cap from the header, full decode, facts) and the
sample-level checks of :mod:`curation.stages.validate` (length, turns).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from curation.cache import ArrayStore
from curation.config import CurateConfig, SourceConfig
from curation.images import ImageInspector
from curation.records import ImageFacts, Item
from curation.sources.llava import read_records
from curation.sources.sharegpt import ShareGPTError, to_llava_record, translate_reason
from curation.sources.webdataset import extract_shard, shard_records, shards_of
from curation.stages.validate import sample_problem
from vlm_core.data.errors import DataError
from vlm_core.data.llava import validate_records
from vlm_core.types import QuarantinedRecord

log = logging.getLogger(__name__)

FACTS_VERSION = "facts-v3"  # bump when ImageFacts' definition changes


@dataclass
class IngestedSource:
    """What one source gave: its items, its quarantined records, and where it came from."""

    name: str
    items: list[Item]
    quarantined: list[QuarantinedRecord]
    lineage: dict[str, Any] = field(default_factory=dict)  # for the manifest: files, world hashes, truth file

    @property
    def ingested(self) -> int:
        return len(self.items) + len(self.quarantined)


def _progress(records: Iterable, name: str, show: bool) -> Iterator:
    return iter(tqdm(records, desc=f"ingest {name}", unit="rec", disable=not show, leave=False))


def _pre_quarantine(
    records: Iterable[tuple[int, Any, str | None]], file: str, out: list[QuarantinedRecord]
) -> Iterator[tuple[int, Any, str | None]]:
    """Quarantine under its own id a record that a reader could not use but whose id is readable."""
    for index, record, error in records:
        if error is not None and isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
            label = str(record["id"]).strip()
            if label and label.isprintable() and label.encode("utf-8", "replace").decode() == label:
                out.append(QuarantinedRecord(source=file, record=label, reason=error))
                continue
        yield index, record, error


def _sharegpt(records: Iterable[tuple[int, Any, str | None]]) -> Iterator[tuple[int, Any, str | None]]:
    for index, record, error in records:
        if error is None:
            try:
                record = to_llava_record(record)
            except ShareGPTError as exc:
                error = str(exc)
        yield index, record, error


def _validate_file(
    name: str, records: Iterable[tuple[int, Any, str | None]], file: str, image_root: Path, cfg: CurateConfig,
    inspector: ImageInspector, sharegpt: bool = False,
) -> tuple[list[Item], list[QuarantinedRecord]]:
    early: list[QuarantinedRecord] = []
    records = _pre_quarantine(_progress(records, name, cfg.show_progress), file, early)
    samples, quarantined = validate_records(
        records, file, image_root, source=name, max_images=cfg.validate.max_images, check_image=inspector.check
    )
    if sharegpt:
        quarantined = [QuarantinedRecord(q.source, q.record, translate_reason(q.reason)) for q in quarantined]
    items = []
    for sample in samples:
        problem = sample_problem(sample, cfg.validate)
        if problem:
            quarantined.append(QuarantinedRecord(source=file, record=sample.id, reason=problem))
            continue
        facts = tuple(inspector.facts[path] for path in sample.image_paths)
        items.append(Item(uid=f"{name}/{sample.id}", source=name, sample=sample, images=facts))
    return items, early + quarantined


def ingest_source(name: str, source: SourceConfig, cfg: CurateConfig, inspector: ImageInspector) -> IngestedSource:
    """Read and validate one source; generate it first for the world kinds (cached in ``cfg.cache_dir``)."""
    cache = Path(cfg.cache_dir).expanduser()
    if source.kind in ("llava", "sharegpt"):
        path = Path(source.path).expanduser()
        if not path.is_file():
            raise DataError(f"source {name}: {path} not found; check sources.{name}.path")
        records = read_records(path)
        if source.kind == "sharegpt":
            records = _sharegpt(records)
        items, bad = _validate_file(name, records, str(path), Path(source.image_root).expanduser(), cfg, inspector,
                                    sharegpt=source.kind == "sharegpt")
        return IngestedSource(name, items, bad, {"kind": source.kind, "path": str(path)})
    if source.kind == "webdataset":
        items, bad = [], []
        shards = shards_of(Path(source.path).expanduser())
        for shard in shards:
            extracted = extract_shard(shard, cache / "webdataset")
            shard_items, shard_bad = _validate_file(name, shard_records(extracted), str(shard), extracted.folder, cfg,
                                                    inspector)
            items += shard_items
            bad += shard_bad
        return IngestedSource(name, items, bad, {"kind": "webdataset", "shards": [str(s) for s in shards]})
    if source.kind == "world":
        from curation.sources.world.writer import build_world

        world = build_world(source.world, cache, show_progress=cfg.show_progress)
        items, bad = _validate_file(name, read_records(world.train_json), str(world.train_json), world.image_root, cfg,
                                    inspector)
        lineage = {"kind": "world", "world_hash": world.config_hash, "world_dir": str(world.dir),
                   "scenes": str(world.scenes), "image_root": str(world.image_root)}
        return IngestedSource(name, items, bad, lineage)
    from curation.sources.world.dirty_writer import build_dirty_world

    dirty = build_dirty_world(source.world, source.dirty, cache, show_progress=cfg.show_progress)
    items, bad = _validate_file(name, read_records(dirty.train_json), str(dirty.train_json), dirty.image_root, cfg,
                                inspector)
    lineage = {"kind": "dirty_world", "world_hash": dirty.world_hash, "dirty_hash": dirty.config_hash,
               "dirty_dir": str(dirty.dir), "scenes": str(dirty.scenes), "truth": str(dirty.truth),
               "image_root": str(dirty.image_root), "file": str(dirty.train_json)}
    return IngestedSource(name, items, bad, lineage)


def load_facts_cache(cache_dir: Path) -> tuple[ArrayStore, dict[str, ImageFacts]]:
    """The stored image facts, keyed by content hash."""
    store = ArrayStore(cache_dir / "facts" / FACTS_VERSION)
    facts: dict[str, ImageFacts] = {}
    for chunk in store.chunks:
        for i, key in enumerate(chunk["keys"].tolist()):
            facts[key] = ImageFacts(
                width=int(chunk["width"][i]), height=int(chunk["height"][i]), pixel_sha=str(chunk["pixel_sha"][i]),
                content_sha=key, phash=tuple(int(v) for v in chunk["phash"][i]), mean=float(chunk["mean"][i]),
                std=float(chunk["std"][i]), thumb=chunk["thumb"][i],
            )
    return store, facts


def save_facts(store: ArrayStore, new: dict[str, ImageFacts]) -> None:
    if not new:
        return
    values = list(new.values())
    store.put(list(new), {
        "width": np.array([f.width for f in values], dtype=np.int64),
        "height": np.array([f.height for f in values], dtype=np.int64),
        "pixel_sha": np.array([f.pixel_sha for f in values]),
        "phash": np.array([f.phash for f in values], dtype=np.uint64),  # [N, 3]
        "mean": np.array([f.mean for f in values], dtype=np.float32),
        "std": np.array([f.std for f in values], dtype=np.float32),
        "thumb": np.stack([f.thumb for f in values]),
    })


def ingest(cfg: CurateConfig) -> list[IngestedSource]:
    """Every configured source, in order; image facts come from (and go to) the content-hash cache."""
    cache_dir = Path(cfg.cache_dir).expanduser()
    store, cached = load_facts_cache(cache_dir)
    inspector = ImageInspector(cfg.validate.max_pixels, cached)
    results = []
    for name, source in cfg.sources.items():
        result = ingest_source(name, source, cfg, inspector)
        save_facts(store, inspector.new)  # after each source, so a killed run keeps the decoded facts
        inspector.new = {}
        log.info("source %s: %d records, %d valid, %d quarantined", name, result.ingested, len(result.items),
                 len(result.quarantined))
        results.append(result)
    return results
