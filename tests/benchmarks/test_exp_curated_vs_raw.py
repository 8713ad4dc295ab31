"""benchmarks/exp_curated_vs_raw.py at toy sizes: both arms train on every seed, the accounting of the two
manifests adds up, the results carry the header STYLE.md asks for and a plot, and a second invocation with
another seed reuses the curated manifest and the finished runs instead of redoing them."""

from __future__ import annotations

import pyarrow.parquet as pq

from benchmarks import exp_curated_vs_raw as exp


def _run(tmp_path, seeds: list[str]) -> dict:
    return exp.main(["--smoke", "--seeds", *seeds, "--work", str(tmp_path / "work"), "--cache-dir",
                     str(tmp_path / "cache"), "--out", str(tmp_path / "out" / "result.md")])


def test_smoke_run_and_reuse(tmp_path):
    results = _run(tmp_path, ["0", "1"])
    for arm in ("raw", "curated"):
        counts = results[arm]["curation"]
        removed = sum(counts["removed_by_stage"].values())
        assert counts["ingested"] == counts["kept"] + counts["quarantined"] + removed
        assert sorted(results[arm]["runs"]) == [0, 1]
    assert sum(results["raw"]["curation"]["removed_by_stage"].values()) == 0
    assert results["curated"]["curation"]["kept"] < results["raw"]["curation"]["kept"]
    text = (tmp_path / "out" / "result.md").read_text()
    for field in ("device:", "date:", "commit:", "versions:", "command:"):
        assert f"- {field}" in text
    assert "Curated beats raw on the overall held-out accuracy in" in text and "Median overall" in text
    assert (tmp_path / "out" / "result.png").stat().st_size > 0

    manifest = tmp_path / "work" / "curated" / "manifest.parquet"
    hashes = set(pq.read_table(manifest, columns=["config_hash"]).column("config_hash").to_pylist())
    finished = (tmp_path / "work" / "train-raw-seed0" / "eval.json").stat()
    tower = (tmp_path / "work" / "tower-seed0" / "checkpoints" / "latest.json").stat()
    results = _run(tmp_path, ["2"])  # seed 2 only: curation still embeds with seed 0's tower (--curation-seed)
    assert sorted(results["curated"]["runs"]) == [2]
    assert set(pq.read_table(manifest, columns=["config_hash"]).column("config_hash").to_pylist()) == hashes
    assert (tmp_path / "work" / "train-raw-seed0" / "eval.json").stat().st_mtime_ns == finished.st_mtime_ns
    # seed 0's cached tower is not pretrained again (invocations side by side would race on its run dir)
    assert (tmp_path / "work" / "tower-seed0" / "checkpoints" / "latest.json").stat().st_mtime_ns == tower.st_mtime_ns
    assert (tmp_path / "work" / "tower-seed2" / "checkpoints" / "latest.json").is_file()


def test_another_lr_gets_its_own_runs(tmp_path):
    _run(tmp_path, ["0"])
    results = exp.main(["--smoke", "--seeds", "0", "--lr", "1e-3", "--work", str(tmp_path / "work"), "--cache-dir",
                        str(tmp_path / "cache"), "--out", str(tmp_path / "out" / "lr.md")])
    assert (tmp_path / "work" / "train-curated-seed0-lr0.001" / "eval.json").is_file()
    assert "peak lr 0.001" in (tmp_path / "out" / "lr.md").read_text()
    assert sorted(results["raw"]["runs"]) == [0]
