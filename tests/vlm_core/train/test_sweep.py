"""``train.py -m`` sweep summaries: one row per job folder, replicate means, jobs without results kept and explained.

The job folders are written with the project's own writers (Hydra's overrides.yaml through OmegaConf, eval.json
from EvalReport, metrics.jsonl from MetricsLogger); the last test runs a real two-job sweep with train.py.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from tests.test_train_e2e import SMALL
from vlm_core.cli import TrainSweepCallback
from vlm_core.train.metrics import MetricsLogger
from vlm_core.train.sweep import FAILED_FILE, NO_EVAL, collate_sweep, main, read_overrides, sweep_jobs
from vlm_core.types import EvalReport

ROOT = Path(__file__).resolve().parents[3]
CHANCE = {"color": 1 / 9, "count": 1 / 6}


def write_job(folder: Path, overrides: list[str], skills: dict[str, float] | None = None,
              losses: tuple[float, ...] = (2.0, 1.5)) -> Path:
    """A job folder as train.py leaves it: .hydra/overrides.yaml, metrics.jsonl and (with ``skills``) eval.json."""
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    logger = MetricsLogger(folder, tensorboard=False)
    for step, loss in enumerate(losses, start=1):
        logger.log(100 + step * 10, "instruct", {"loss": loss, "lr": 1e-3, "stage_step": step * 10})
    logger.close()
    if skills is not None:
        report = EvalReport(overall=statistics.fmean(skills.values()), skills=skills,
                            counts={s: 3 for s in skills}, chance=CHANCE)
        (folder / "eval.json").write_text(json.dumps(report.to_json()))
    return folder


def rows_of(sweep: Path) -> dict[str, dict[str, str]]:
    return {row["job"]: row for row in csv.DictReader((sweep / "sweep_summary.csv").open())}


def test_rows_means_and_jobs_without_results(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    scores = {  # job → (world weight, seed, color, count)
        "0": ("0.5", "0", 0.5, 0.3), "1": ("0.5", "1", 0.7, 0.5),
        "2": ("2.5", "0", 0.9, 0.6), "3": ("2.5", "1", 1.0, 0.8),
    }
    for name, (weight, seed, color, count) in scores.items():
        write_job(sweep / name, ["data=manifest", f"mixture.weights.world={weight}", f"train.seed={seed}"],
                  {"color": color, "count": count})
    write_job(sweep / "4", ["data=manifest", "mixture.weights.world=0.5", "train.seed=2"])  # killed: no eval.json
    failed = write_job(sweep / "5", ["data=manifest", "mixture.weights.world=2.5", "train.seed=2"], losses=())
    (failed / FAILED_FILE).write_text("ValueError: train.lr must be > 0\n")
    write_job(sweep / "6", ["data=manifest", "mixture.weights.world=2.5", "train.seed=3"])
    (sweep / "6" / "eval.json").write_text('{"overall": 0.5')  # cut short

    jobs = collate_sweep(sweep, title="mixture sweep")

    assert [job.name for job in jobs] == ["0", "1", "2", "3", "4", "5", "6"]
    rows = rows_of(sweep)
    assert set(rows["0"]) == {"job", "mixture.weights.world", "train.seed", "overall", "color", "count", "loss",
                              "step", "problem"}  # data=manifest is the same in every job, so it is not a column
    assert float(rows["3"]["color"]) == 1.0 and float(rows["3"]["overall"]) == pytest.approx(0.9)
    assert float(rows["0"]["loss"]) == 1.5 and rows["0"]["step"] == "20"  # the last instruct record
    assert rows["4"]["problem"] == NO_EVAL and rows["4"]["overall"] == "" and float(rows["4"]["loss"]) == 1.5
    assert rows["5"]["problem"] == "failed: ValueError: train.lr must be > 0" and rows["5"]["loss"] == ""
    assert rows["6"]["problem"].startswith("eval.json unreadable (JSONDecodeError")

    markdown = (sweep / "sweep_summary.md").read_text()
    assert markdown.startswith("# mixture sweep\n\n7 jobs, 4 with held-out accuracy, 3 without")
    # Weight 0.5: colour 0.5 and 0.7, count 0.3 and 0.5; the killed seed-2 job is counted, not averaged.
    mean = statistics.fmean([0.4, 0.6])
    std = statistics.stdev([0.4, 0.6])
    assert f"| 0.5 | 2 of 3 | {mean:.3f} ± {std:.3f} | 0.600 ± 0.141 | 0.400 ± 0.141 |" in markdown
    assert "| 2.5 | 2 of 4 | 0.825 ± 0.106 | 0.950 ± 0.071 | 0.700 ± 0.141 |" in markdown
    assert "| chance |  |  |  | 0.111 | 0.167 |  |  |" in markdown
    assert "- `5` (mixture.weights.world=2.5, train.seed=2): failed: ValueError" in markdown
    assert "![held-out accuracy per skill](sweep_summary.png)" in markdown
    assert (sweep / "sweep_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_replicates_there_is_no_mean_table(tmp_path: Path) -> None:
    for index, lr in enumerate(["1e-3", "3e-3"]):
        write_job(tmp_path / str(index), [f"train.lr={lr}"], {"color": 0.5 + index / 4})
    collate_sweep(tmp_path)
    markdown = (tmp_path / "sweep_summary.md").read_text()
    assert "| 1 | 3e-3 | 0.750 | 0.750 | 1.5000 | 20 |" in markdown
    assert "## Mean" not in markdown and "Jobs without results" not in markdown


def test_job_order_is_numeric_and_nested_subdirs_are_found(tmp_path: Path) -> None:
    for name in ["10_uniform", "9_adaptive", "2_none"]:
        write_job(tmp_path / "jobs" / name, [f"strategy={name.split('_')[1]}"], {"color": 1.0})
    (tmp_path / "submitit" / "123").mkdir(parents=True)  # submitit's logs: not a job folder
    assert [p.name for p in sweep_jobs(tmp_path)] == ["2_none", "9_adaptive", "10_uniform"]


def test_override_prefixes_and_bad_override_files(tmp_path: Path) -> None:
    path = tmp_path / "overrides.yaml"
    OmegaConf.save(OmegaConf.create(["+data.extra=1", "++train.lr=2e-3", "~eval.limit_per_skill", "a=b=c"]), path)
    assert read_overrides(path) == {"data.extra": "1", "train.lr": "2e-3", "eval.limit_per_skill": "", "a": "b=c"}
    path.write_text("train.lr: 1\n")
    with pytest.raises(ValueError, match="expected a list of key=value overrides"):
        read_overrides(path)
    (tmp_path / "job" / ".hydra").mkdir(parents=True)
    (tmp_path / "job" / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
    [job] = collate_sweep(tmp_path)
    assert job.problem.startswith("unreadable .hydra/overrides.yaml")


def test_cli_names_a_folder_that_is_no_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "absent")]) == 2
    assert f"sweep folder {tmp_path / 'absent'} does not exist" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no job folders" in capsys.readouterr().err
    write_job(tmp_path / "0", ["train.seed=0"])
    assert main([str(tmp_path)]) == 0
    assert f"0: {NO_EVAL}" in capsys.readouterr().out


def test_callback_records_a_failed_job_and_clears_it_on_success(tmp_path: Path) -> None:
    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}})
    failed = JobReturn(status=JobStatus.FAILED)
    failed.return_value = ValueError("rounds_train.lr must be > 0")
    TrainSweepCallback().on_job_end(config=config, job_return=failed)
    assert (tmp_path / FAILED_FILE).read_text() == "ValueError: rounds_train.lr must be > 0\n"
    done = JobReturn(status=JobStatus.COMPLETED)
    done.return_value = 0.5
    TrainSweepCallback().on_job_end(config=config, job_return=done)
    assert not (tmp_path / FAILED_FILE).exists()


@pytest.mark.slow
def test_train_sweep_with_a_failing_job(tmp_path: Path) -> None:
    """A real ``train.py -m``: one job trains, one fails on a bad learning rate. Hydra then skips the sweep's end,
    so the summary is collated by hand, and it keeps the failed job with its error."""
    sweep = tmp_path / "sweep"
    command = [sys.executable, "train.py", "-m", f"hydra.sweep.dir={sweep}", f"data.cache_dir={tmp_path / 'cache'}",
               *SMALL, "train.tower.enabled=false", "train.precision=fp32", "eval.limit_per_skill=2",
               "train.lr=2e-3,-1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "train.lr" in result.stderr, result.stderr[-3000:]
    assert (sweep / "1" / FAILED_FILE).read_text().startswith("ValueError:")
    assert not (sweep / "sweep_summary.md").exists()  # Hydra does not call on_multirun_end after a failed job

    collated = subprocess.run([sys.executable, "-m", "vlm_core.train.sweep", str(sweep)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert collated.returncode == 0, collated.stderr
    assert "2 jobs (1 without results)" in collated.stdout
    rows = rows_of(sweep)
    report = json.loads((sweep / "0" / "eval.json").read_text())
    assert rows["0"]["train.lr"] == "0.002" and float(rows["0"]["overall"]) == pytest.approx(report["overall"])
    assert rows["1"]["train.lr"] == "-1" and rows["1"]["problem"].startswith("failed: ValueError:")
