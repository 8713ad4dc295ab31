"""``torchrun --nproc_per_node 2 train.py parallel.tensor_parallel=2`` end to end, then resumed by one process.

The TP=2 job writes sharded checkpoints, metrics and the evaluation of the merged model; a single-process
``train.py`` resumed from its mid-run checkpoint (TP=2 -> TP=1 through the job's own resume path) logs the
same losses for the remaining steps, within the float32 tolerance the worker test justifies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_e2e import SMALL, read_metrics
from tests.vlm_core.parallel.test_tensor_parallel import free_port

ROOT = Path(__file__).resolve().parents[3]
# fp32: the TP layers compute in fp32 under CPU bf16 autocast and the rest would not, so compare in fp32.
OVERRIDES = [*SMALL, "train.precision=fp32", "train.log_every=1", "train.ckpt_every=10", "train.tower.enabled=false"]
# 4 ulps of a loss near 4 in float32 (ulp 4.8e-7): the worker test measured <= 2 ulps between TP=2 and TP=1.
LOSS_TOLERANCE = 2e-6


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert result.returncode == 0, f"{' '.join(command[:6])} ... failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.mark.slow
def test_torchrun_tp2_trains_and_a_single_process_resumes_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tp_dir = tmp_path / "tp2"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "train.py", f"hydra.run.dir={tp_dir}", f"data.cache_dir={cache}",
         *OVERRIDES, "parallel.tensor_parallel=2"])
    checkpoints = sorted(p for p in (tp_dir / "checkpoints").glob("step-*"))
    files = sorted(p.name for p in checkpoints[-1].iterdir())
    assert files == ["model-tp00-of-02.safetensors", "model-tp01-of-02.safetensors",
                     "optimizer-tp00-of-02.safetensors", "optimizer-tp01-of-02.safetensors", "state.json"]
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    assert state["parallel"] == {"tensor_parallel": 2, "data_parallel": 1} and state["tensor_parallel"]["size"] == 2
    report = json.loads((tp_dir / "eval.json").read_text())
    assert 0.0 <= report["overall"] <= 1.0 and len(report["skills"]) == 8
    tp_losses = {r["step"]: r["loss"] for r in read_metrics(tp_dir) if r["stage"] == "instruct"}
    assert len(tp_losses) == 20

    middle = checkpoints[0]  # instruct step 10 of 20
    resumed_dir = tmp_path / "resumed_tp1"
    run([sys.executable, "train.py", f"hydra.run.dir={resumed_dir}", f"data.cache_dir={cache}", *OVERRIDES,
         f"train.resume={middle}"])
    resumed = {r["step"]: r["loss"] for r in read_metrics(resumed_dir) if r["stage"] == "instruct"}
    assert sorted(resumed) == sorted(tp_losses)[10:], "the resumed run must continue after the checkpoint's step"
    worst = max(abs(resumed[s] - tp_losses[s]) for s in resumed)
    assert worst <= LOSS_TOLERANCE, f"TP=1 resumed from TP=2 drifts: max |loss difference| {worst:.3g}"
