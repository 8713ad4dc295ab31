"""The fused-kernel benchmarks in their CPU smoke mode: they run eager and ours (Triton's interpreter),
write their tables with the STYLE.md header, and skip (with the reason) what cannot run here."""

from __future__ import annotations

import csv
import importlib.util

import pytest
import torch

from benchmarks import bench_linear_cross_entropy, bench_norm_swiglu, bench_projector

TRITON = importlib.util.find_spec("triton") is not None


def read_rows(csv_path):
    lines = [line for line in csv_path.read_text().splitlines() if not line.startswith("# ")]
    return list(csv.DictReader(lines))


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    ("bench", "options", "stem", "unit", "ops"),
    [(bench_norm_swiglu, [], "norm_swiglu", "GB/s", 2),
     (bench_linear_cross_entropy, [], "linear_cross_entropy", "TFLOP/s", 1),
     (bench_projector, [], "projector", "TFLOP/s", 1),
     (bench_projector, ["--layer-norm"], "projector_layernorm", "TFLOP/s", 1)],
    ids=["norm_swiglu", "linear_cross_entropy", "projector", "projector_layernorm"],
)  # fmt: skip
def test_smoke_run_writes_tables_with_header(bench, options, stem, unit, ops, tmp_path):
    md_path, csv_path = bench.main(["--smoke", "--modes", "full", "--out-dir", str(tmp_path), *options])
    assert md_path.name == f"{stem}_smoke_cpu.md"
    text = md_path.read_text()
    script = bench.__name__.split(".")[-1]
    for key in ("device: CPU", "date: ", "commit: ", "versions: torch", f"command: `python benchmarks/{script}.py --smoke"):
        assert key in text, f"{key!r} missing from the header:\n{text[:1500]}"
    rows = read_rows(csv_path)
    assert len(rows) == 3 * ops  # eager, compiled, ours per op
    for row in rows:
        if row["provider"] == "compiled" and not torch.cuda.is_available():
            assert row["note"].startswith("skipped: compiled only on CUDA"), row
            continue
        assert row["ms"] and float(row["ms"]) > 0 and float(row[unit]) > 0, row  # eager and ours both ran
        assert float(row["x vs ours"]) > 0, row
    if unit == "GB/s":
        assert "bandwidth ceiling: " in text and all(r["% of ceiling"] for r in rows if r["ms"])
