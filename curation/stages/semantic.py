"""Stage 3, semantic dedup (SemDeDup, Abbas et al. 2023) with FAISS.

1. Spherical k-means (``faiss.Kmeans(spherical=True)``, seeded) on unit embeddings; each item joins its
   nearest centroid by inner product, and also its second-nearest when that is within ``boundary_margin``
   (a pair split by a cluster boundary is otherwise never compared: 1.1% of the pairs at epsilon 0.05 on
   benchmarks/bench_dedup.py's workload without it).
2. Within each cluster, an exact inner-product search (``IndexFlatIP``) lists every earlier item whose
   cosine similarity exceeds ``1 - max(epsilons)``.
3. For each epsilon, items are visited in input order and an item is removed when its similarity to an
   *earlier kept* item exceeds ``1 - epsilon``. All epsilons come from the one search.

The search is independent per cluster: :func:`shard_plan` splits the clusters into groups of similar cost
for separate jobs, and :func:`merge_pairs` joins their pairs (curation/semantic_shards.py does the files).

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


def merge_pairs(parts: Sequence[Neighbours]) -> Neighbours:
    """All pairs of ``parts`` once each (an item searched in two clusters meets some pairs twice, and so do
    two shards of one search), sorted by (later, earlier)."""
    if not parts:
        empty = np.zeros(0, np.int64)
        return Neighbours(empty, empty, np.zeros(0, np.float32))
    later = np.concatenate([p.later for p in parts])
    earlier = np.concatenate([p.earlier for p in parts])
    similarity = np.concatenate([p.similarity for p in parts])
    # A pair met twice (in two clusters) may carry two similarities that differ in the last bits (another
    # batch, another summation order): keep the larger, so the result does not depend on the parts' order.
    order = np.lexsort((-similarity, earlier, later))
    later, earlier, similarity = later[order], earlier[order], similarity[order]
    first = np.ones(later.size, dtype=bool)
    first[1:] = (later[1:] != later[:-1]) | (earlier[1:] != earlier[:-1])
    return Neighbours(later[first], earlier[first], similarity[first])


@dataclass
class Clusters:
    """The k-means side of SemDeDup: each item's nearest centroid, its second-nearest, and whether it is
    searched in that second cluster too (a guest). Computed once; the pair search can then be split
    by cluster across jobs (:func:`shard_plan`)."""

    k: int
    assignment: np.ndarray  # [N] int64, nearest centroid
    second: np.ndarray  # [N] int64, second-nearest centroid (the nearest where k == 1)
    guests: np.ndarray  # [N] bool, also searched in ``second``

    def members(self, cluster: int) -> np.ndarray:
        """Global indices (ascending) searched in ``cluster``: its own items and its guests."""
        return np.flatnonzero((self.assignment == cluster) | (self.guests & (self.second == cluster)))

    def searched_sizes(self) -> np.ndarray:
        """[k] items searched in each cluster (guests included)."""
        return (np.bincount(self.assignment, minlength=self.k)
                + np.bincount(self.second[self.guests], minlength=self.k))  # fmt: skip


def cluster_items(x: np.ndarray, cfg: SemanticConfig, gpu: bool) -> Clusters:
    """Spherical k-means of unit vectors ``x`` into ``cfg.clusters`` clusters (default :func:`default_clusters`,
    at most one per item), with the boundary guests (see the module)."""
    k = min(cfg.clusters or default_clusters(len(x)), len(x))
    _, nearest, similarity = spherical_kmeans(x, k, cfg.niter, cfg.seed, cfg.max_points_per_centroid, gpu, nearest=2)
    guests = np.zeros(len(x), dtype=bool)
    if nearest.shape[1] > 1:
        guests = similarity[:, 1] >= similarity[:, 0] - cfg.boundary_margin
    return Clusters(k, nearest[:, 0], nearest[:, -1], guests)


def shard_plan(clusters: Clusters, shards: int) -> list[np.ndarray]:
    """Split the clusters into ``shards`` groups of similar search cost (the sum of squared searched sizes),
    largest first onto the cheapest group; deterministic. Every cluster is in exactly one group."""
    if shards < 1:
        raise ValueError(f"shard_plan: shards={shards} must be >= 1")
    sizes = clusters.searched_sizes().astype(np.float64)
    cost = np.zeros(shards)
    groups: list[list[int]] = [[] for _ in range(shards)]
    for cluster in np.argsort(-(sizes**2), kind="stable"):
        target = int(np.argmin(cost))
        groups[target].append(int(cluster))
        cost[target] += sizes[cluster] ** 2
    return [np.sort(np.asarray(g, dtype=np.int64)) for g in groups]


def search_pairs(x: np.ndarray, clusters: Clusters, which: Sequence[int] | np.ndarray, threshold: float, gpu: bool,
                 show_progress: bool = False) -> Neighbours:  # fmt: skip
    """Every pair above ``threshold`` within each cluster of ``which``, each pair once, sorted by (later, earlier)."""
    parts = []
    for cluster in tqdm(which, desc="semantic: clusters", unit="cluster", disable=not show_progress, leave=False):
        members = clusters.members(int(cluster))
        if members.size > 1:
            parts.append(cluster_neighbours(x, members, threshold, gpu))
    return merge_pairs(parts)


def search_threshold(cfg: SemanticConfig) -> float:
    """The one search's similarity threshold: that of the largest epsilon, so every epsilon is counted."""
    return 1.0 - max(cfg.epsilon, *cfg.epsilons)


def semantic_dedup(
    x: np.ndarray, uids: Sequence[str], cfg: SemanticConfig, show_progress: bool = False, gpu: bool | None = None,
    clusters: Clusters | None = None, pairs: Neighbours | None = None,
) -> StageResult:
    """SemDeDup over unit embeddings ``x`` ([N, D] float32), applying ``cfg.epsilon``; counts for ``cfg.epsilons``.

    An item whose second-nearest centroid is within ``cfg.boundary_margin`` (inner product) of its nearest
    is searched in both clusters, so a duplicate pair split by a cluster boundary is still found.
    Columns: ``cluster`` (nearest k-means centroid of each input), ``max_similarity`` (to any earlier item
    searched with it; 0 if none), ``semantic_of`` (index of the kept item a removed one duplicates, else -1).
    ``clusters`` and ``pairs`` take a clustering and a search done elsewhere (the sharded run of
    curation/pipeline.py: :func:`cluster_items` once, :func:`search_pairs` per shard, :func:`merge_pairs`);
    by default both are computed here.
    """
    n = len(uids)
    if x.shape[0] != n:
        raise ValueError(f"semantic_dedup: {x.shape[0]} embeddings for {n} items")
    if n == 0:
        return StageResult("semantic", 0, summary={"clusters": 0})
    x = np.ascontiguousarray(x, dtype=np.float32)
    gpu = use_gpu() if gpu is None else gpu
    if clusters is None:
        clusters = cluster_items(x, cfg, gpu)
    if len(clusters.assignment) != n:
        raise ValueError(f"semantic_dedup: a clustering of {len(clusters.assignment)} items for {n} items")
    if pairs is None:
        pairs = search_pairs(x, clusters, range(clusters.k), search_threshold(cfg), gpu, show_progress)
    k, assignment, guests = clusters.k, clusters.assignment, clusters.guests
    epsilons = sorted({*cfg.epsilons, cfg.epsilon})
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
