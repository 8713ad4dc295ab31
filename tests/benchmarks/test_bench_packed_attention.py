"""benchmarks/bench_packed_attention.py in its CPU smoke mode: it runs, writes its tables with the
header STYLE.md asks for, its providers agree, and its FLOP count is the number of unmasked pairs."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_packed_attention as bench
from vlm_core.kernels import packed_attention_mask

ROOT = Path(__file__).resolve().parents[2]
TRITON = importlib.util.find_spec("triton") is not None


def read_rows(csv_path):
    lines = [line for line in csv_path.read_text().splitlines() if not line.startswith("# ")]
    return list(csv.DictReader(lines))


def test_smoke_run_writes_tables_with_header(tmp_path):
    # ours is left to the next test: it needs TRITON_INTERPRET=1 before triton is first imported.
    md_path, csv_path = bench.main(["--smoke", "--providers", "reference", "sdpa", "flex", "--out-dir", str(tmp_path)])
    text = md_path.read_text()
    for key in ("device: CPU", "date: ", "commit: ", "versions: torch", "command: `python benchmarks/bench_packed_attention.py --smoke"):
        assert key in text, f"{key!r} missing from the header:\n{text[:1500]}"
    rows = read_rows(csv_path)
    assert {r["workload"] for r in rows} == {"llava", "causal"}
    assert {r["mode"] for r in rows} == {"forward", "backward", "full"}
    timed = {(r["provider"], r["mode"]) for r in rows if r["ms"]}
    for provider in ("reference", "sdpa"):
        assert {(provider, m) for m in ("forward", "backward", "full")} <= timed
    assert ("flex", "forward") in timed
    for row in rows:
        if row["ms"]:
            assert float(row["ms"]) > 0 and float(row["TFLOP/s"]) > 0, row
        else:
            assert row["note"].startswith("skipped: "), row  # nothing fails silently
        if row["max |out - first|"]:
            # fp32 attention over <= 203 unit-scale keys: a few ulps; a wrong mask is O(0.1).
            assert float(row["max |out - first|"].split()[0]) < 1e-5, row
    assert any(r["provider"] == "flex" and r["mode"] == "full" and "no backward on the CPU" in r["note"] for r in rows)


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_smoke_command_runs_ours_under_the_interpreter(tmp_path):
    """The command line, in a fresh process so TRITON_INTERPRET=1 is set before triton is imported."""
    command = [
        sys.executable, "benchmarks/bench_packed_attention.py", "--smoke", "--totals", "64", "--workloads", "llava",
        "--modes", "forward", "full", "--out-dir", str(tmp_path),
    ]
    result = subprocess.run(
        command, check=False, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(tmp_path / "packed_attention_smoke_cpu.csv")
    ours = [r for r in rows if r["provider"] == "ours"]
    assert ours and all(r["ms"] and r["x vs ours"] == "1.00" for r in ours), ours
    # the interpreter's single config, named per kernel the mode ran
    notes = {r["mode"]: r["note"] for r in ours}
    assert notes == {"forward": "tuned: forward 32x16 w4 s1",
                     "full": "tuned: forward 32x16 w4 s1, dkdv 32x16 w4 s1, dq 32x16 w4 s1"}, notes
    atomic = {r["mode"]: r for r in rows if r["provider"] == "ours_atomic_dq"}
    assert atomic["forward"]["note"] == "skipped: its forward is ours'" and not atomic["forward"]["ms"]
    assert atomic["full"]["ms"] and atomic["full"]["x vs ours"], atomic["full"]
    assert atomic["full"]["note"] == "tuned: forward 32x16 w4 s1, dkdv 32x16 w4 s1", atomic["full"]
    peers = [r for r in rows if r["provider"] in ("reference", "sdpa") and r["mode"] == "forward"]
    assert all(r["x vs ours"] and r["max |out - first|"].endswith("(ours)") for r in peers), peers
    assert all(float(r["max |out - first|"].split()[0]) < 1e-5 for r in peers), peers


@pytest.mark.parametrize("workload", ["llava", "causal"])
@pytest.mark.parametrize("total, seed", [(64, 0), (203, 1), (500, 2)])
def test_allowed_pairs_is_the_mask_count(workload, total, seed):
    case = bench.setup(workload, total, (2, 1), 16, torch.float32, torch.device("cpu"), bench.SMOKE, seed)
    mask = packed_attention_mask(case.cu_seqlens, case.bidir_group, total)
    assert case.pairs == int(mask.sum())
    assert int(case.cu_seqlens[-1]) == total
    lengths = (case.cu_seqlens[1:] - case.cu_seqlens[:-1]).tolist()
    assert min(lengths) > 0 and max(lengths) == case.max_seqlen


def test_llava_rows_hold_several_images_per_sample():
    lengths, images = bench.packed_row(32768, bench.LLAVA, seed=0)
    assert sum(lengths) == 32768
    assert all(n == 576 for _, n in images) and len(images) > len(lengths) / 2
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    segment_of = [max(i for i, s in enumerate(starts[:-1]) if s <= start) for start, _ in images]
    assert any(segment_of.count(s) >= 2 for s in set(segment_of)), "no sample with two or more images"
    for (start, n), segment in zip(images, segment_of):
        assert start + n <= starts[segment + 1], "an image crosses a segment boundary"


def test_runs_at_other_head_dims_get_tables_of_their_own(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda")
    names = {tuple(dims): bench.default_stem(gpu, dims, smoke=False) for dims in ([128], [64], [64, 128])}
    assert len(set(names.values())) == 3
    assert names[(64,)].endswith("_dh64") and names[(64, 128)].endswith("_dh64-128")
    assert names[(128,)] == "packed_attention_nvidia-h100-80gb-hbm3"  # the targets' tables keep their name


def test_a_run_cut_before_its_first_case_leaves_earlier_tables_alone(tmp_path, monkeypatch):
    """The 2026-11-24 H100 run at Dh 64, cut by its time limit, replaced the Dh-128 table with an empty one."""
    earlier = tmp_path / "packed_attention_smoke_cpu.md"
    earlier.write_text("an earlier run's table\n")

    def cut(*args, **kwargs):
        raise KeyboardInterrupt  # what `timeout --signal=INT` delivers

    monkeypatch.setattr(bench, "run_case", cut)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--smoke", "--providers", "reference", "--out-dir", str(tmp_path)])
    assert earlier.read_text() == "an earlier run's table\n"
    assert not (tmp_path / "packed_attention_smoke_cpu.csv").exists()
