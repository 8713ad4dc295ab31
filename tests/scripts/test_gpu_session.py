"""scripts/gpu_session.sh: each stage runs its steps within the budget and archives exactly what it produced,
checked on the CPU with the benchmarks' --smoke sizes in a copy of the repository (the stage writes into
benchmarks/results, which must not touch the checkout under test)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def copy(tmp_path):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    root = tmp_path / "repo"
    for name in filter(None, files.stdout.split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


def _stage(root: Path, stage: str, **env) -> subprocess.CompletedProcess:
    environ = dict(os.environ, GPU_SESSION_SMOKE="1", OUT=str(root / "out"), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", "scripts/gpu_session.sh", stage], cwd=root, env=environ, capture_output=True,
                          text=True, timeout=600)


def test_fused_stage_archives_its_four_results_and_its_log(copy):
    proc = _stage(copy, "fused")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (copy / "out" / "fused.log").read_text()
    assert log.count(": exit 0") == 4, log
    with tarfile.open(copy / "out" / "fused.tar.gz") as tar:
        names = set(tar.getnames())
    ops = ("projector", "linear_cross_entropy", "norm_swiglu", "projector_layernorm")
    results = {f"benchmarks/results/{op}_smoke_cpu.md" for op in ops}
    assert results | {"./fused.log"} <= names
    assert not any(n.startswith("benchmarks/results/triton_compile") for n in names)  # only what this stage wrote


def test_a_spent_budget_skips_the_steps_and_still_archives_the_log(copy):
    proc = _stage(copy, "fused", STAGE_BUDGET_S="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (copy / "out" / "fused.log").read_text()
    assert log.count("budget is spent") == 4 and "exit" not in log
    with tarfile.open(copy / "out" / "fused.tar.gz") as tar:
        assert tar.getnames() == ["./fused.log"]


def test_an_unknown_stage_is_refused(copy):
    proc = _stage(copy, "everything")
    assert proc.returncode == 2 and "usage: bash scripts/gpu_session.sh check|attention|fused|train" in proc.stderr
