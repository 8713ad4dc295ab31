"""``python train.py`` end to end on a small world: outputs, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A small world and model so that each run takes seconds; the recipe is the default one otherwise.
SMALL = [
    "train=smoke",
    "data.world.train_per_skill=16",
    "data.world.eval_per_skill=3",
    "data.world.turns_per_record=2",
    "model.layers=2",
    "model.vision.layers=2",
    "train.batch_size=16",
    "train.align.batch_size=16",
    "train.tower.batch_size=32",
    "train.threads=1",
    "eval.max_new_tokens=24",
]


def train_command(run_dir: Path, cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"data.cache_dir={cache}", *SMALL, *overrides]


def run_train(run_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        train_command(run_dir, cache, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses_by_step(records: list[dict]) -> dict[int, float]:
    # The tower stage is left out: a run that finds the pretrained tower in the cache skips it.
    return {r["step"]: r["loss"] for r in records if r["stage"] in ("align", "instruct")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_train_writes_the_run_directory(tmp_path: Path, cache: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train(run_dir, cache)
    report = json.loads((run_dir / "eval.json").read_text())
    skills = ["caption", "color", "count", "existence", "grounding", "ocr", "shape", "spatial"]
    assert sorted(report["skills"]) == skills
    assert all(0.0 <= v <= 1.0 for v in report["skills"].values())
    assert report["chance"]["existence"] == 0.5
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 * 3 and {"question", "answer", "reference", "score"} <= set(predictions[0])
    records = read_metrics(run_dir)
    assert {"step", "loss", "lr"} <= set(records[0])
    instruct = [r for r in records if r["stage"] == "instruct"]
    assert instruct and all(0.0 < r["packing_efficiency"] <= 1.0 for r in instruct)
    assert all(r["tokens_per_s"] > 0 for r in instruct)
    assert [p.name for p in (run_dir / "tb").iterdir()] and (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest.json").is_file()
    assert (run_dir / "quarantine.jsonl").read_text() == ""
    assert "chance" in result.stdout and "overall" in result.stdout


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_losses(tmp_path: Path, cache: Path) -> None:
    overrides = ["train.max_steps=40", "train.log_every=1", "train.ckpt_every=10"]
    reference_dir = tmp_path / "reference"
    run_train(reference_dir, cache, *overrides)
    reference = losses_by_step(read_metrics(reference_dir))

    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        train_command(run_dir, cache, *overrides), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    killed_at = None
    while time.monotonic() < deadline and process.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        records = read_metrics(run_dir) if metrics.exists() else []
        instruct = [r["stage_step"] for r in records if r["stage"] == "instruct"]
        if instruct and instruct[-1] >= 13:  # past the checkpoint at instruct step 10, before the next one
            os.killpg(process.pid, signal.SIGKILL)
            killed_at = instruct[-1]
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    assert killed_at is not None, "the run finished or stalled before it could be killed between checkpoints"
    assert not (run_dir / "eval.json").exists()

    run_train(run_dir, cache, *overrides, "train.resume=true")
    resumed = losses_by_step(read_metrics(run_dir))
    assert sorted(resumed) == sorted(reference), "the resumed run must log every step exactly once"
    mismatched = {s: (reference[s], resumed[s]) for s in reference if resumed[s] != reference[s]}
    assert not mismatched, f"losses differ after resuming (step: (uninterrupted, resumed)): {mismatched}"
