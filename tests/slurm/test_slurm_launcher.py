"""``python train.py -m hydra/launcher=...`` through a real Slurm cluster (hydra-submitit-launcher + submitit).

- a 2-job sweep: both jobs run on the cluster and write their run directories; sacct reports them COMPLETED;
- preemption: a 2-task job (TP=2 over gloo, torch.distributed from submitit's environment) is sent
  ``scancel --signal=USR2`` mid-training; it checkpoints at the next step boundary, submitit requeues it,
  and the requeued job resumes from that checkpoint. Its losses, weights and evaluation equal those of the
  same job run without interruption (the other job of the same sweep), bit for bit.

Each test has its own sweep and submitit folder (job ids restart when the cluster's state is wiped).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_train_e2e import SMALL, read_metrics

ROOT = Path(__file__).resolve().parents[2]
# The smallest job that still runs every stage after the tower (pretrained towers are cached per run here).
TINY = [*SMALL, "train.tower.enabled=false", "train.precision=fp32", "eval.limit_per_skill=2"]

pytestmark = pytest.mark.slow


def sweep(sweep_dir: Path, cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", "-m", f"hydra.sweep.dir={sweep_dir}",
            f"hydra.launcher.submitit_folder={sweep_dir}/submitit/%j", f"data.cache_dir={cache}", *TINY, *overrides]


def sacct_states(job_id: str) -> dict[str, str]:
    out = subprocess.run(["sacct", "--noheader", "--allocations", "--parsable2", "--jobs", job_id,
                          "--format=JobID,State"], capture_output=True, text=True, check=False).stdout
    return dict(line.split("|", 1) for line in out.split())


def array_job_id(sweep_dir: Path) -> str:
    """The Slurm array job id of a sweep (submitit's folders are named after it)."""
    return min((p.name for p in (sweep_dir / "submitit").iterdir() if p.name.isdigit()), key=int)


def instruct_losses(run_dir: Path) -> dict[int, float]:
    records = [r for r in read_metrics(run_dir) if r["stage"] == "instruct"]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"{run_dir}: a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_two_job_sweep(slurm_cluster: str, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        sweep(sweep_dir, tmp_path / "cache", "hydra/launcher=submitit_slurm", f"hydra.launcher.partition={slurm_cluster}",
              "hydra.launcher.timeout_min=20", "hydra.launcher.cpus_per_task=1", "train.lr=1e-3,3e-3"),
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=300,
    )
    assert result.returncode == 0, f"sweep failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    job = array_job_id(sweep_dir)
    for index, lr in enumerate((1e-3, 3e-3)):
        run_dir = sweep_dir / str(index)
        report = json.loads((run_dir / "eval.json").read_text())
        assert 0.0 <= report["overall"] <= 1.0
        records = read_metrics(run_dir)
        assert max(r["lr"] for r in records if r["stage"] == "instruct") == pytest.approx(lr)
        assert (run_dir / "checkpoints" / "latest.json").is_file()
    # The sweep's end (in the submitting process, after both Slurm jobs) collated them into one table.
    rows = {row["job"]: row for row in csv.DictReader((sweep_dir / "sweep_summary.csv").open())}
    assert sorted(rows) == ["0", "1"] and [float(rows[j]["train.lr"]) for j in "01"] == [1e-3, 3e-3]
    assert all(float(rows[j]["overall"]) == json.loads((sweep_dir / j / "eval.json").read_text())["overall"]
               for j in "01")
    deadline = time.monotonic() + 30  # slurmdbd records the end a moment after the job ends
    while time.monotonic() < deadline:
        states = sacct_states(job)
        if states.get(f"{job}_0") == states.get(f"{job}_1") == "COMPLETED":
            break
        time.sleep(0.5)
    assert states.get(f"{job}_0") == states.get(f"{job}_1") == "COMPLETED", f"sacct: {states}"


def test_preempted_job_is_requeued_and_resumes_exactly(slurm_cluster: str, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # Two identical 2-task TP=2 jobs (train.seed=0,0): job 0 is preempted, job 1 is the uninterrupted reference.
    # The node has 2 CPUs and each job takes 2, so they run one after the other.
    command = sweep(sweep_dir, tmp_path / "cache", "hydra/launcher=slurm_cpu", f"hydra.launcher.partition={slurm_cluster}",
                    "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=30", "parallel.tensor_parallel=2",
                    "train.align.enabled=false", "train.max_steps=60", "train.ckpt_every=20", "train.log_every=1",
                    "train.seed=0,0")
    launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_dir = sweep_dir / "0"
        signalled_at = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and launcher.poll() is None:
            records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
            steps = [r["stage_step"] for r in records if r["stage"] == "instruct"]
            if steps and steps[-1] >= 23:  # past the periodic checkpoint at step 20
                job = f"{array_job_id(sweep_dir)}_0"
                subprocess.run(["scancel", "--signal=USR2", job], check=True)
                signalled_at = steps[-1]
                break
            time.sleep(0.05)
        assert signalled_at is not None, "job 0 finished or never started before it could be preempted"
        output, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, f"the sweep failed after the preemption:\n{output[-5000:]}"

    job = f"{array_job_id(sweep_dir)}_0"
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=False).stdout
    assert "Restarts=1" in shown, f"job {job} was not requeued exactly once:\n{shown}"
    log = (run_dir / "train.log").read_text()
    assert "preemption: checkpoint of step" in log and "resuming from" in log, log[-3000:]
    preempted, reference = instruct_losses(run_dir), instruct_losses(sweep_dir / "1")
    assert sorted(preempted) == sorted(reference) and len(reference) == 60
    differ = {s: (preempted[s], reference[s]) for s in reference if preempted[s] != reference[s]}
    assert not differ, f"losses after the requeue differ from the uninterrupted job: {differ}"
    for rank in range(2):
        name = f"model-tp{rank:02d}-of-02.safetensors"
        final = [max((sweep_dir / str(i) / "checkpoints").glob("step-*")) / name for i in (0, 1)]
        a, b = load_file(str(final[0])), load_file(str(final[1]))
        assert all(a[key].equal(b[key]) for key in b), f"final weights ({name}) differ from the uninterrupted job's"
    assert json.loads((run_dir / "eval.json").read_text()) == json.loads((sweep_dir / "1" / "eval.json").read_text())
