"""Stage 3, semantic dedup (SemDeDup, Abbas et al. 2023) with FAISS.

1. Spherical k-means (``faiss.Kmeans(spherical=True)``, seeded) on unit embeddings; each item joins its
   nearest centroid by inner product, and also its second-nearest when that is within ``boundary_margin``
   (a pair split by a cluster boundary is otherwise never compared: 1.1% of the pairs at epsilon 0.05 on
   benchmarks/bench_dedup.py's workload without it).
2. Within each cluster, an exact inner-product search (``IndexFlatIP``) lists every earlier item whose
   cosine similarity exceeds ``1 - max(epsilons)``.
3. For each epsilon, items are visited in input order and an item is removed when its similarity to an
   *earlier kept* item exceeds ``1 - epsilon``. All epsilons come from the one search.

"Earlier" is input order (sources in config order, records in file order), so the first copy is kept;
SemDeDup's paper orders by distance to the centroid instead. Search and clustering run on the GPU when
``faiss.get_num_gpus() > 0`` (faiss-gpu) and on the CPU otherwise, through the same code: the CPU index is
built and then moved with ``faiss.index_cpu_to_all_gpus``. The GPU sums in another order, so similarities
can differ in the last bits; decisions differ only for pairs within ~1e-6 of a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm

from curation.config import SemanticConfig
from curation.records import StageResult

GPU_MAX_K = 2048  # faiss-gpu's largest k for a flat search
FIRST_K = 32  # neighbours asked for first; doubled for the rows whose k-th neighbour is still above threshold


def use_gpu() -> bool:
    """Whether faiss can use a GPU here (faiss-gpu installed and a device visible)."""
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def default_clusters(n: int) -> int:
    """k = round(sqrt(n / 2)), at least 1: ~700 clusters of ~1,400 for a million items."""
    return max(1, round(math.sqrt(n / 2)))


def spherical_kmeans(
    x: np.ndarray, k: int, niter: int, seed: int, max_points_per_centroid: int, gpu: bool | None = None,
    nearest: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster unit vectors x ([N, D] float32).

    Returns centroids [k, D], the ``nearest`` closest centroids of each item [N, nearest] int64 (best first)
    and their inner products [N, nearest] float32.
    """
    n, d = x.shape
    k = min(k, n)
    gpu = use_gpu() if gpu is None else gpu
    kmeans = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, verbose=False, gpu=gpu,
                          max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    kmeans.train(x)
    index = faiss.IndexFlatIP(d)
    index.add(kmeans.centroids)
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    similarity, assignment = index.search(x, min(nearest, k))
    return kmeans.centroids, assignment.astype(np.int64), similarity


@dataclass
class Neighbours:
    """Pairs (later, earlier, similarity) of one cluster's items above the lowest threshold, sorted by later."""

    later: np.ndarray  # [M] int64, global item index
    earlier: np.ndarray  # [M] int64, global item index, earlier < later
    similarity: np.ndarray  # [M] float32


def cluster_neighbours(x: np.ndarray, members: np.ndarray, threshold: float, gpu: bool) -> Neighbours:
    """Every pair of ``members`` (global indices, ascending) with inner product > ``threshold``."""
    vectors = np.ascontiguousarray(x[members])  # [n_c, D]
    n_c = len(members)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(vectors)
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    limit = min(n_c, GPU_MAX_K) if gpu else n_c
    rows = np.arange(n_c)
    later, earlier, similarity = [], [], []
    k = min(FIRST_K, n_c)
    while rows.size:
        sims, ids = index.search(vectors[rows], k)  # [r, k] each, best first
        done = (sims[:, -1] <= threshold) | (k >= n_c)
        if k >= limit and not done.all():
            # The GPU search cannot go deeper than GPU_MAX_K: finish these rows with an exact product.
            for row in rows[~done]:
                values = vectors @ vectors[row]  # [n_c]
                hit = np.flatnonzero((values > threshold) & (np.arange(n_c) < row))
                later.append(np.full(hit.size, row))
                earlier.append(hit)
                similarity.append(values[hit])
            rows = rows[done]
            sims, ids = sims[done], ids[done]
            done = np.ones(rows.size, dtype=bool)
        finished = rows[done]
        s, j = sims[done], ids[done]
        mask = (s > threshold) & (j >= 0) & (j < finished[:, None])
        later.append(np.repeat(finished, mask.sum(axis=1)))
        earlier.append(j[mask])
        similarity.append(s[mask])
        rows = rows[~done]
        k = min(2 * k, limit)
    local_later = np.concatenate(later).astype(np.int64) if later else np.zeros(0, np.int64)
    local_earlier = np.concatenate(earlier).astype(np.int64) if earlier else np.zeros(0, np.int64)
    sims_all = np.concatenate(similarity).astype(np.float32) if similarity else np.zeros(0, np.float32)
    order = np.lexsort((local_earlier, local_later))
    return Neighbours(members[local_later[order]], members[local_earlier[order]], sims_all[order])


def greedy_removals(pairs: Neighbours, threshold: float) -> dict[int, tuple[int, float]]:
    """Visit items in order; remove one whose similarity to an earlier kept item exceeds ``threshold``.

    Returns removed item → (the kept item it duplicates, their similarity).
    """
    removed: dict[int, tuple[int, float]] = {}
    above = pairs.similarity > threshold
    later, earlier, similarity = pairs.later[above], pairs.earlier[above], pairs.similarity[above]
    start = 0
    while start < len(later):
        stop = start
        while stop < len(later) and later[stop] == later[start]:
            stop += 1
        item = int(later[start])
        for j in range(start, stop):
            if int(earlier[j]) not in removed:  # an earlier item that was itself removed does not count
                removed[item] = (int(earlier[j]), float(similarity[j]))
                break
        start = stop
    return removed


def _unique_pairs(parts: list[Neighbours]) -> Neighbours:
    """All pairs of ``parts`` once each (an item searched in two clusters meets some pairs twice), sorted."""
    if not parts:
        empty = np.zeros(0, np.int64)
        return Neighbours(empty, empty, np.zeros(0, np.float32))
    later = np.concatenate([p.later for p in parts])
    earlier = np.concatenate([p.earlier for p in parts])
    similarity = np.concatenate([p.similarity for p in parts])
    order = np.lexsort((earlier, later))
    later, earlier, similarity = later[order], earlier[order], similarity[order]
    first = np.ones(later.size, dtype=bool)
    first[1:] = (later[1:] != later[:-1]) | (earlier[1:] != earlier[:-1])
    return Neighbours(later[first], earlier[first], similarity[first])


def clustered_pairs(
    x: np.ndarray, k: int, cfg: SemanticConfig, threshold: float, gpu: bool, show_progress: bool = False
) -> tuple[Neighbours, np.ndarray, np.ndarray]:
    """The SemDeDup search: spherical k-means into ``k`` clusters, then every pair above ``threshold`` within each.

    An item whose second-nearest centroid is within ``cfg.boundary_margin`` (inner product) of its nearest
    is searched in both clusters. Returns the unique pairs, each item's nearest centroid ([N] int64) and
    whether it was searched in two clusters ([N] bool).
    """
    _, nearest, similarity = spherical_kmeans(x, k, cfg.niter, cfg.seed, cfg.max_points_per_centroid, gpu, nearest=2)
    assignment = nearest[:, 0]
    guests = np.zeros(len(x), dtype=bool)
    if nearest.shape[1] > 1:
        guests = similarity[:, 1] >= similarity[:, 0] - cfg.boundary_margin
    parts = []
    for cluster in tqdm(range(k), desc="semantic: clusters", unit="cluster", disable=not show_progress, leave=False):
        members = np.flatnonzero((assignment == cluster) | (guests & (nearest[:, -1] == cluster)))  # ascending
        if members.size > 1:
            parts.append(cluster_neighbours(x, members, threshold, gpu))
    return _unique_pairs(parts), assignment, guests


def semantic_dedup(
    x: np.ndarray, uids: Sequence[str], cfg: SemanticConfig, show_progress: bool = False, gpu: bool | None = None
) -> StageResult:
    """SemDeDup over unit embeddings ``x`` ([N, D] float32), applying ``cfg.epsilon``; counts for ``cfg.epsilons``.

    An item whose second-nearest centroid is within ``cfg.boundary_margin`` (inner product) of its nearest
    is searched in both clusters, so a duplicate pair split by a cluster boundary is still found.
    Columns: ``cluster`` (nearest k-means centroid of each input), ``max_similarity`` (to any earlier item
    searched with it; 0 if none), ``semantic_of`` (index of the kept item a removed one duplicates, else -1).
    """
    n = len(uids)
    if x.shape[0] != n:
        raise ValueError(f"semantic_dedup: {x.shape[0]} embeddings for {n} items")
    if n == 0:
        return StageResult("semantic", 0, summary={"clusters": 0})
    x = np.ascontiguousarray(x, dtype=np.float32)
    gpu = use_gpu() if gpu is None else gpu
    k = min(cfg.clusters or default_clusters(n), n)
    epsilons = sorted({*cfg.epsilons, cfg.epsilon})
    pairs, assignment, guests = clustered_pairs(x, k, cfg, 1.0 - max(epsilons), gpu, show_progress)
    max_similarity = np.zeros(n, dtype=np.float32)
    np.maximum.at(max_similarity, pairs.later, pairs.similarity)
    removed_per_eps = {eps: greedy_removals(pairs, 1.0 - eps) for eps in epsilons}
    applied = removed_per_eps[cfg.epsilon]
    removed = {
        i: f"semantic duplicate of {uids[j]} (cosine {s:.4f} > 1 - epsilon = {1 - cfg.epsilon:.4f}, cluster {assignment[i]})"
        for i, (j, s) in sorted(applied.items())
    }
    semantic_of = np.full(n, -1, dtype=np.int64)
    for i, (j, _) in applied.items():
        semantic_of[i] = j
    sizes = np.bincount(assignment, minlength=k)
    summary = {
        "clusters": int(k),
        "device": "gpu" if gpu else "cpu",
        "searched_in_two_clusters": int(guests.sum()),
        "pairs_above_lowest_threshold": int(pairs.later.size),
        "removed_per_epsilon": {f"{eps:g}": len(removed_per_eps[eps]) for eps in epsilons},
        "epsilon": cfg.epsilon,
        "cluster_sizes": sizes.tolist(),
    }
    return StageResult("semantic", n, removed,
                       {"cluster": assignment, "max_similarity": max_similarity, "semantic_of": semantic_of}, summary)
