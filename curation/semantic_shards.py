"""Semantic dedup across jobs: the clustering done once, the pair search split by cluster, then merged.

SemDeDup's search is independent per cluster, so it splits into shards of clusters
(:func:`curation.stages.semantic.shard_plan`), one job each (e.g. one Slurm job per shard through
hydra-submitit-launcher). Only the decisions need every pair, and they are cheap. The files sit under
``<output_dir>/stages/`` beside the other stages' results:

    semantic-clusters.npz            the k-means result (key, assignment, second, guests), written once
    .semantic-clusters.lock          held while a job clusters; jobs that start together wait, then read it
    semantic-pairs-<i>-of-<n>.npz    shard i's pairs (key, later, earlier, similarity)

Every file carries the key of what it was computed from (the rows' content, the embedders, the
semantic settings other than ``shard``, and for the pairs the clustering's digest), so a stale file is
recomputed, never used. The merging run searches any shard it does not find itself and logs that, so a run
with ``shards > 1`` always finishes with the same pairs as ``shards=1``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from curation.cache import atomic_savez
from curation.config import SemanticConfig
from curation.stages.semantic import (
    Clusters,
    Neighbours,
    cluster_items,
    merge_pairs,
    search_pairs,
    search_threshold,
    shard_plan,
)

log = logging.getLogger(__name__)

CLUSTERS = "semantic-clusters.npz"


def search_settings(cfg: SemanticConfig) -> dict[str, Any]:
    """The settings the clustering and the search depend on (not which shard a job takes)."""
    settings = asdict(cfg)
    settings.pop("shard")
    return settings


def pairs_path(directory: Path, shard: int, shards: int) -> Path:
    return directory / f"semantic-pairs-{shard}-of-{shards}.npz"


def _saved(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of ``path`` if it exists and was computed under ``key``."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        if str(saved["key"]) != key:
            log.info("semantic: %s was computed from other inputs or settings; recomputing it", path.name)
            return None
        return {name: saved[name] for name in saved.files}


def clusters_digest(clusters: Clusters) -> str:
    h = hashlib.sha256(np.int64(clusters.k).tobytes())
    for array in (clusters.assignment, clusters.second, clusters.guests):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


def load_or_cluster(directory: Path, key: str, x: np.ndarray, cfg: SemanticConfig, gpu: bool) -> Clusters:
    """The clustering saved under ``key``, or computed and saved now, under a lock: jobs that start at once
    cluster once, and all of them search the same clusters (k-means run twice need not agree to the bit)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".semantic-clusters.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = _saved(directory / CLUSTERS, key)
        if saved is not None:
            log.info("semantic: reusing the clustering in %s", directory / CLUSTERS)
            return Clusters(int(saved["k"]), saved["assignment"], saved["second"], saved["guests"])
        clusters = cluster_items(x, cfg, gpu)
        log.info("semantic: clustered %d items into %d clusters (once, for every shard)", len(x), clusters.k)
        atomic_savez(directory / CLUSTERS, {"key": np.array(key), "k": np.array(clusters.k),
                                           "assignment": clusters.assignment, "second": clusters.second,
                                           "guests": clusters.guests})  # fmt: skip
        return clusters


def search_shards(directory: Path, key: str, x: np.ndarray, clusters: Clusters, cfg: SemanticConfig,
                  shards: Sequence[int], gpu: bool, show_progress: bool = False) -> list[Neighbours]:  # fmt: skip
    """The pairs of each of ``shards`` (of ``cfg.shards``): from its saved file, or searched and saved now."""
    digest, plan = clusters_digest(clusters), shard_plan(clusters, cfg.shards)
    found = []
    for shard in shards:
        path = pairs_path(directory, shard, cfg.shards)
        shard_key = f"{key}/{digest}/{shard}-of-{cfg.shards}"
        saved = _saved(path, shard_key)
        if saved is not None:
            found.append(Neighbours(saved["later"], saved["earlier"], saved["similarity"]))
            continue
        log.info("semantic: searching shard %d of %d (%d clusters)", shard, cfg.shards, len(plan[shard]))
        pairs = search_pairs(x, clusters, plan[shard], search_threshold(cfg), gpu, show_progress)
        atomic_savez(path, {"key": np.array(shard_key), "later": pairs.later, "earlier": pairs.earlier,
                            "similarity": pairs.similarity})  # fmt: skip
        found.append(pairs)
    return found


def merged_search(directory: Path, key: str, x: np.ndarray, clusters: Clusters, cfg: SemanticConfig, gpu: bool,
                  show_progress: bool = False) -> Neighbours:  # fmt: skip
    """Every shard's pairs, merged: the saved shards read, the missing or stale ones searched here."""
    missing = [shard for shard in range(cfg.shards) if not pairs_path(directory, shard, cfg.shards).is_file()]
    if missing:
        log.warning("semantic: no saved result for shard(s) %s of %d; searching them in this run", missing, cfg.shards)
    return merge_pairs(search_shards(directory, key, x, clusters, cfg, range(cfg.shards), gpu, show_progress))
