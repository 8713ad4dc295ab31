"""benchmarks/bench_dedup.py --smoke: the benchmark runs, and its recall check against brute force is real."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_dedup.py"


def test_bench_dedup_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_dedup", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.main(["--smoke", "--shards", "3", "--out", str(tmp_path / "bench.md")])
    assert figures["n"] == 4000 and figures["dedup_s"] > 0
    for eps, (rate, total, hit) in figures["recall"].items():
        assert total > 0 and rate >= 0.99, (eps, rate, total, hit)
    assert "Recall of the duplicate pairs" in (tmp_path / "bench.md").read_text()
    sharded = figures["sharded"]
    assert sharded["same_pairs"] and sharded["pairs"] > 0 and len(sharded["shard_s"]) == 3
    assert "shards of clusters" in (tmp_path / "bench.md").read_text()
