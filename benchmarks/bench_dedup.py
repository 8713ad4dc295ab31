"""Benchmark of semantic dedup (curation.stages.semantic): speed on 1M x 384-d embeddings, recall against brute force.

Workload (one setup for both measurements, seeded): ``n`` unit vectors in ``dim`` dimensions drawn around
``topics`` random centres (intra-topic cosine ~0.4, like sentence embeddings of one subject), of which a
``dup_fraction`` are near-copies of an earlier vector (Gaussian noise, cosine 0.97-0.995 to the original),
some of them chained (a copy of a copy).

1. Speed: ``semantic_dedup`` end to end on all ``n`` (spherical k-means with k = sqrt(n/2), exact inner-product
   search within each cluster, greedy removal for every epsilon), timed with perf_counter. Throughput is
   reported as items/s and as GFLOP/s of the two matrix products that dominate:

       k-means   = 2 * dim * k * (training points) * niter      (assignment products of Lloyd's iterations)
       assign    = 2 * dim * k * n                               (the final nearest-centroid search)
       in-cluster= 2 * dim * sum over clusters of n_c * (k-NN width, >= FIRST_K)   (approximate: counted as n_c^2)

2. Recall: on the first ``recall_n`` vectors, every pair with cosine > 1 - epsilon found by exact brute force
   (blocked matrix products over all pairs) against the pairs the clustered search finds on that subset.
   A pair is missed when k-means puts its two items in different clusters. Reported per epsilon.

    python benchmarks/bench_dedup.py                              # 1M x 384, recall on 50k (minutes on 2 cores)
    python benchmarks/bench_dedup.py --n 100000 --recall-n 20000  # smaller
    python benchmarks/bench_dedup.py --smoke                      # seconds; what tests/benchmarks runs
    python benchmarks/bench_dedup.py --shards 8                   # also the search split as semantic.shards=8 splits it

Results go to benchmarks/results/bench_dedup_<device>.md with the device, date, commit, versions and command.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.provenance import git_commit
from curation.config import SemanticConfig
from curation.embed import l2_normalize
from curation.stages.semantic import (
    cluster_items,
    merge_pairs,
    search_pairs,
    search_threshold,
    semantic_dedup,
    shard_plan,
    use_gpu,
)


def setup(n: int, dim: int, topics: int, dup_fraction: float, seed: int) -> np.ndarray:
    """[n, dim] float32 unit vectors with planted near-duplicates (see the module docstring)."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((topics, dim), dtype=np.float32))
    x = np.empty((n, dim), dtype=np.float32)
    chunk = 100_000
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        topic = rng.integers(0, topics, size=stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) / np.sqrt(dim)
        x[start:stop] = l2_normalize(centres[topic] + 1.2 * noise)
    copies = np.flatnonzero(rng.random(n) < dup_fraction)
    copies = copies[copies > 0]
    sources = (rng.random(copies.size) * copies).astype(np.int64)  # an earlier item (maybe itself a copy)
    scale = rng.uniform(0.1, 0.25, size=(copies.size, 1)).astype(np.float32) / np.sqrt(dim)
    for start in range(0, copies.size, chunk):
        part = slice(start, start + chunk)
        noise = rng.standard_normal((copies[part].size, dim), dtype=np.float32) * scale[part]
        x[copies[part]] = l2_normalize(x[sources[part]] + noise)
    return x


def brute_force_pairs(x: np.ndarray, threshold: float, block: int = 4096) -> set[tuple[int, int]]:
    """Every (earlier, later) pair with inner product > threshold, by blocked exact products."""
    pairs = set()
    for start in range(0, len(x), block):
        sims = x[start : start + block] @ x.T  # [b, n]
        rows, cols = np.nonzero(sims > threshold)
        rows = rows + start
        keep = cols < rows
        pairs.update(zip(cols[keep].tolist(), rows[keep].tolist()))
    return pairs


def clustered_pairs(x: np.ndarray, cfg: SemanticConfig, threshold: float, gpu: bool) -> set[tuple[int, int]]:
    """The (earlier, later) pairs above ``threshold`` that semantic_dedup's clustered search finds."""
    clusters = cluster_items(x, cfg, gpu)
    found = search_pairs(x, clusters, range(clusters.k), threshold, gpu)
    return set(zip(found.earlier.tolist(), found.later.tolist()))


def sharded_run(x: np.ndarray, cfg: SemanticConfig, shards: int, gpu: bool, reference: dict) -> dict:
    """The search split into ``shards`` (as ``semantic.shards`` runs it, here one shard after another):
    seconds to cluster, per shard and to merge + decide; the merged pairs against one search over the same
    clusters, and the removals against ``reference`` (the unsharded run's, which clustered separately)."""
    uids, threshold = [str(i) for i in range(len(x))], search_threshold(cfg)
    started = time.perf_counter()
    clusters = cluster_items(x, cfg, gpu)
    cluster_s = time.perf_counter() - started
    parts, seconds = [], []
    for which in shard_plan(clusters, shards):
        started = time.perf_counter()
        parts.append(search_pairs(x, clusters, which, threshold, gpu))
        seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    merged = merge_pairs(parts)
    result = semantic_dedup(x, uids, cfg, gpu=gpu, clusters=clusters, pairs=merged)
    decide_s = time.perf_counter() - started
    whole = search_pairs(x, clusters, range(clusters.k), threshold, gpu)
    same_pairs = all(np.array_equal(getattr(merged, f), getattr(whole, f)) for f in ("later", "earlier", "similarity"))
    return {"shards": shards, "cluster_s": cluster_s, "shard_s": seconds, "decide_s": decide_s,
            "pairs": int(merged.later.size), "same_pairs": same_pairs,
            "same_removals": result.removed == reference}  # fmt: skip


def versions() -> str:
    names = ("numpy", "faiss-cpu", "faiss-gpu-cu12", "torch")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores" + (", faiss GPU" if use_gpu() else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="embeddings in the speed run")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--recall-n", type=int, default=50_000, help="subset compared with brute force")
    parser.add_argument("--topics", type=int, default=2000)
    parser.add_argument("--dup-fraction", type=float, default=0.1)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for the test suite")
    parser.add_argument("--out", type=Path, default=None, help="results markdown (default benchmarks/results/...)")
    parser.add_argument("--note", default="", help="a line added to the results (e.g. other load on the machine)")
    parser.add_argument("--shards", type=int, default=0, help="also run the search split into this many shards")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.recall_n, args.topics = 4000, 2000, 50
    gpu = use_gpu()
    cfg = SemanticConfig(epsilon=max(args.epsilons), epsilons=args.epsilons)

    started = time.perf_counter()
    x = setup(args.n, args.dim, args.topics, args.dup_fraction, args.seed)
    setup_s = time.perf_counter() - started
    started = time.perf_counter()
    result = semantic_dedup(x, [str(i) for i in range(args.n)], cfg, show_progress=not args.smoke, gpu=gpu)
    dedup_s = time.perf_counter() - started
    k = result.summary["clusters"]
    sizes = np.asarray(result.summary["cluster_sizes"], dtype=np.float64)
    train_points = min(args.n, k * cfg.max_points_per_centroid)
    flops = 2 * args.dim * k * (train_points * cfg.niter + args.n) + 2 * args.dim * float((sizes**2).sum())

    subset = x[: args.recall_n]
    recall = {}
    for eps in args.epsilons:
        exact = brute_force_pairs(subset, 1.0 - eps)
        found = clustered_pairs(subset, cfg, 1.0 - eps, gpu)
        recall[eps] = (len(exact & found) / len(exact) if exact else 1.0, len(exact), len(found & exact))

    figures = {"n": args.n, "dim": args.dim, "clusters": k, "setup_s": setup_s, "dedup_s": dedup_s,
               "items_per_s": args.n / dedup_s, "gflops": flops / dedup_s / 1e9,
               "removed": result.summary["removed_per_epsilon"], "recall": recall, "device": result.summary["device"]}
    lines = [
        f"# bench_dedup: semantic dedup of {args.n:,} x {args.dim}-d embeddings", "",
        f"- device: {device_name()}; faiss on the {figures['device']}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- commit: {git_commit()}",
        f"- versions: Python {platform.python_version()}, {versions()}",
        f"- command: `python benchmarks/bench_dedup.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
    ]
    if args.note:
        lines.append(f"- note: {args.note}")
    lines += [
        "", "| n | dim | k | dedup end to end (s) | items/s | GFLOP/s (formula in the script) | removed per epsilon |",
        "|---:|---:|---:|---:|---:|---:|---|",
        (f"| {args.n:,} | {args.dim} | {k} | {dedup_s:.1f} | {args.n / dedup_s:,.0f} | {figures['gflops']:.1f} | "
        f"{figures['removed']} |"), "",
        f"Setup (generating the embeddings, not timed above): {setup_s:.1f} s.", "",
        f"Recall of the duplicate pairs exact brute force finds, on the first {args.recall_n:,} vectors:", "",
        "| epsilon | pairs (brute force) | found by the clustered search | recall |", "|---:|---:|---:|---:|",
    ]
    lines += [f"| {eps:g} | {total:,} | {hit:,} | {rate:.4f} |" for eps, (rate, total, hit) in recall.items()]
    if args.shards:
        shard = sharded_run(x, cfg, args.shards, gpu, result.removed)
        figures["sharded"] = shard
        times = shard["shard_s"]
        lines += [
            "", f"The search split into {args.shards} shards of clusters (`semantic.shards`; here one after another "
            "in one process), on all n:", "",
            "| cluster once (s) | search per shard, min / median / max (s) | max / mean | merge + decide (s) | "
            "pairs | merged = one search over the same clusters | removals = the unsharded run's |",
            "|---:|---|---:|---:|---:|---|---|",
            (f"| {shard['cluster_s']:.1f} | {min(times):.1f} / {float(np.median(times)):.1f} / {max(times):.1f} | "
             f"{max(times) / (sum(times) / len(times)):.2f} | {shard['decide_s']:.1f} | {shard['pairs']:,} | "
             f"{'yes' if shard['same_pairs'] else 'NO'} | {'yes' if shard['same_removals'] else 'no'} |"),
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke or args.out:
        out = args.out or ROOT / "benchmarks" / "results" / f"bench_dedup_{'gpu' if gpu else 'cpu'}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return figures


if __name__ == "__main__":
    main()
