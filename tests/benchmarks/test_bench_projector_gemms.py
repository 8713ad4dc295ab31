"""The fused projector's launch-by-launch benchmark in its CPU smoke mode: every launch recorded and timed,
and each GEMM's torch.mm peer built from the same operands the kernel read (checked against its output)."""

from __future__ import annotations

import csv
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_projector_gemms as bpg
from benchmarks.bench_projector import setup
from vlm_core.kernels import fused_projector_kernels as fpk

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def read_rows(csv_path):
    lines = [line for line in csv_path.read_text().splitlines() if not line.startswith("# ")]
    return list(csv.DictReader(lines))


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_smoke_run_times_every_launch(layer_norm, tmp_path):
    md_path, csv_path = bpg.main(["--smoke", "--out-dir", str(tmp_path)] + (["--layer-norm"] if layer_norm else []))
    text = md_path.read_text()
    for key in ("device: CPU", "commit: ", "versions: torch", "command: `python benchmarks/bench_projector_gemms.py"):
        assert key in text, key
    rows = read_rows(csv_path)
    launches = [(r["mode"], r["launch"]) for r in rows if r["provider"] == "ours"]
    forward = [bpg.GEMM_NAMES[fpk._FWD_GELU], bpg.GEMM_NAMES[fpk._FWD_SCATTER]]
    backward = [bpg.GEMM_NAMES[k] for k in (fpk._BWD_DACT, fpk._BWD_DW2)] + [bpg.OTHER_NAMES["column_sum"]]
    backward += [bpg.GEMM_NAMES[k] for k in (fpk._BWD_DW1, fpk._BWD_DX)]
    if layer_norm:
        forward.insert(0, bpg.OTHER_NAMES["layer_norm_stats"])
        backward.append(bpg.OTHER_NAMES["layer_norm_backward"])
    totals = ["sum of the launches above", "the whole pass (autograd)"]
    assert launches == [("forward", n) for n in forward + totals] + [("backward", n) for n in backward + totals]
    for row in rows:
        assert float(row["ms"]) > 0 and float(row["x vs ours"]) > 0, row
        if row["M"] and row["provider"] == "ours":  # a GEMM: its rate is 2 M N K over its time (3 digits each)
            flops = 2 * int(row["M"]) * int(row["N"]) * int(row["K"])
            assert float(row["TFLOP/s"]) == pytest.approx(flops / (float(row["ms"]) * 1e-3) / 1e12, rel=1e-2)
    peers = [r for r in rows if r["provider"] == "torch.mm"]
    assert len(peers) == 6 + 2  # a peer per GEMM and one sum per pass
    d_w2 = next(r for r in rows if r["launch"] == bpg.GEMM_NAMES[fpk._BWD_DW2])
    assert (d_w2["A"], d_w2["B"]) == ("M-major", "N-major")  # d embeds' image rows, gathered beforehand
    d_pre = next(r for r in rows if r["launch"] == bpg.GEMM_NAMES[fpk._BWD_DACT])
    assert (d_pre["A"], d_pre["B"]) == ("K-major, gathered rows", "N-major")
    fc1 = next(r for r in rows if r["launch"] == bpg.GEMM_NAMES[fpk._FWD_GELU])
    assert fc1["A"] == ("K-major, LayerNorm" if layer_norm else "K-major") and fc1["B"] == "K-major"


def test_peer_operands_are_the_kernels_operands():
    """torch.mm of each GEMM's peer operands gives what the kernel computed from them (before its epilogue)."""
    workload = setup(3, 9, (24, 40, 36), torch.float32, torch.device("cpu"), seed=1)
    launches = [launch for launch in bpg.record_launches(workload) if launch.is_gemm]
    assert sorted(launch.arg("kind") for launch in launches) == sorted(
        (fpk._FWD_GELU, fpk._FWD_SCATTER, fpk._BWD_DACT, fpk._BWD_DW2, fpk._BWD_DW1, fpk._BWD_DX)
    )
    for launch in launches:
        a, b = bpg.peer_operands(launch)
        product = torch.mm(a, b)
        kind, c = launch.arg("kind"), launch.arg("C")
        if kind == fpk._FWD_GELU:  # Pre holds x W1^T + b1
            expected = launch.arg("Pre") - launch.arg("Bias")
        elif kind == fpk._FWD_SCATTER:  # scattered into embeds at rows, bias added
            expected = c[launch.arg("RowsC")] - launch.arg("Bias")
        elif kind == fpk._BWD_DACT:  # d pre = (G[rows] W2) * gelu'(pre)
            pre = launch.arg("Pre").detach().requires_grad_(True)
            (slope,) = torch.autograd.grad(F.gelu(pre).sum(), pre)
            product = product * slope
            expected = c
        else:
            expected = c
        torch.testing.assert_close(product, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"kind {kind}: {m}")


def test_gathered_operand_keeps_its_layout():
    storage = torch.arange(40.0).reshape(10, 4)  # 10 rows of 4
    index = torch.tensor([7, 2, 5])
    rows = bpg._logical(storage, (3, 4), (4, 1), index)  # A[t, k] = storage[index[t], k]
    assert torch.equal(rows, storage[index]) and rows.stride() == (4, 1)
    plain = bpg._logical(storage, (4, 10), (1, 4), None)  # A = storage^T, M-major, a view
    assert torch.equal(plain, storage.t()) and plain.data_ptr() == storage.data_ptr()
    with pytest.raises(ValueError, match="not K-major"):
        bpg._logical(storage, (4, 3), (1, 4), index)
    assert bpg.operand_layout((1, 4096), "", "MK") == "M-major"
    assert bpg.operand_layout((4096, 1), "gathered rows", "KN") == "N-major, gathered rows"
