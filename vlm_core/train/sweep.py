"""One table for a Hydra multirun of ``train.py``: ``sweep_summary.csv``, ``.md`` and ``.png`` in the sweep folder.

    python train.py -m data=manifest mixture.weights.world=0.5,1.0,2.5 train.seed=0,1,2
    python -m vlm_core.train.sweep multirun/2026-11-24/10-00-00     # (re)collate a sweep folder by hand

Hydra calls :func:`collate_sweep` when ``train.py -m`` ends (``vlm_core.cli.TrainSweepCallback``), through the
basic launcher and through submitit alike. Hydra skips that call when a job of the sweep failed, so the module
also runs by hand, on a finished, failed or half-finished sweep.

Every job folder (a folder below the sweep folder with ``.hydra/overrides.yaml``) is one row: the overrides that
differ between the jobs, ``eval.json``'s overall and per-skill accuracy, and the last instruction-tuning loss and
step in ``metrics.jsonl``. A job without a readable ``eval.json`` keeps its row, with the reason (and the error
of a failed job, which the callback records in ``job_failed.txt``), so that no job silently drops out of a mean.

Jobs that differ only in their seed (:data:`SEED_KEYS`) are replicates: the second table gives the mean and the
standard deviation of each group (sample std, n - 1), and the heatmap shows the means.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm_core.train.checkpoint import atomic_write_text

__all__ = [
    "FAILED_FILE", "SEED_KEYS", "JobResult", "collate_sweep", "failure_reason", "group_jobs", "read_job", "sweep_jobs",
]

SEED_KEYS = ("train.seed", "seed")  # overrides that make replicates rather than different configurations
FAILED_FILE = "job_failed.txt"  # written into a job folder by the callback when the job raised
NO_EVAL = "no eval.json: the job failed, was killed, is still running, or had no held-out data"


@dataclass
class JobResult:
    """What one job folder of a sweep holds. ``problem`` says why there is no accuracy (None: eval.json read)."""

    name: str  # the job folder, relative to the sweep folder
    overrides: dict[str, str]
    overall: float | None = None
    skills: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)
    loss: float | None = None  # the last logged instruction-tuning loss
    step: int | None = None  # its stage step
    problem: str | None = None


@dataclass
class Group:
    """Jobs whose overrides agree except for the seed; ``values`` are the overrides that vary across the sweep."""

    values: dict[str, str]
    jobs: list[JobResult]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "all jobs"

    def scores(self, metric: str) -> list[float]:
        """The metric ("overall" or a skill) of every job of the group that has it."""
        values = [job.overall if metric == "overall" else job.skills.get(metric) for job in self.jobs]
        return [v for v in values if v is not None]


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """The job folders below ``sweep_dir`` (those with ``.hydra/overrides.yaml``), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep_dir} does not exist")
    found = [p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")]
    return sorted(found, key=lambda p: _natural(str(p.relative_to(sweep_dir))))


def _natural(text: str) -> tuple[tuple[int, Any], ...]:
    """Sort key that puts job 10 after job 9: digit runs compare as numbers."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part)


def _value_key(value: str) -> tuple[Any, ...]:
    """Sort key for an override's value: numbers by value, before any text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def read_overrides(path: Path) -> dict[str, str]:
    """``.hydra/overrides.yaml`` (a list of ``key=value``) as key → value; ``+``/``++``/``~`` prefixes dropped."""
    entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of key=value overrides, got {type(entries).__name__}")
    overrides = {}
    for index, entry in enumerate(entries):
        key, sep, value = str(entry).partition("=")
        if not sep and not str(entry).startswith("~"):
            raise ValueError(f"{path}: entry {index} ({entry!r}) is not key=value")
        overrides[key.lstrip("+~")] = value
    return overrides


def read_job(job_dir: Path, sweep_dir: Path) -> JobResult:
    """One job folder's overrides, accuracy and last loss; ``problem`` set instead of failing on a bad file."""
    name = str(job_dir.relative_to(sweep_dir))
    try:
        job = JobResult(name, read_overrides(job_dir / ".hydra" / "overrides.yaml"))
    except (OSError, ValueError, yaml.YAMLError) as error:
        return JobResult(name, {}, problem=f"unreadable .hydra/overrides.yaml: {error}")
    job.loss, job.step = _last_loss(job_dir / "metrics.jsonl")
    eval_path = job_dir / "eval.json"
    if not eval_path.is_file():
        job.problem = failure_reason(job_dir, NO_EVAL)
        return job
    try:
        report = json.loads(eval_path.read_text(encoding="utf-8"))
        job.overall = float(report["overall"])
        job.skills = {str(k): float(v) for k, v in report["skills"].items()}
        job.chance = {str(k): float(v) for k, v in report.get("chance", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        job.overall, job.skills, job.chance = None, {}, {}
        job.problem = f"eval.json unreadable ({type(error).__name__}: {error})"
    return job


def failure_reason(job_dir: Path, otherwise: str) -> str:
    """"failed: <error>" from the job's ``job_failed.txt`` (the callback's record), else ``otherwise``."""
    failed = Path(job_dir) / FAILED_FILE
    return f"failed: {failed.read_text(encoding='utf-8').strip()}" if failed.is_file() else otherwise


def _last_loss(path: Path) -> tuple[float | None, int | None]:
    """The last instruction-tuning record of metrics.jsonl: (loss, stage step). A torn last line is skipped."""
    if not path.is_file():
        return None, None
    loss = step = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short when the job was killed
        if isinstance(record, dict) and record.get("stage") == "instruct" and isinstance(record.get("loss"), float):
            loss, step = record["loss"], int(record.get("stage_step", record.get("step", 0)))
    return loss, step


def varying_keys(jobs: Sequence[JobResult]) -> list[str]:
    """Override keys whose value is not the same in every job (a key some jobs lack counts as varying)."""
    keys = sorted({key for job in jobs for key in job.overrides})
    return [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1]


def group_jobs(jobs: Sequence[JobResult]) -> list[Group]:
    """Replicate groups: jobs with equal values of every varying override except the seed keys, in value order."""
    keys = [key for key in varying_keys(jobs) if key not in SEED_KEYS]
    groups: dict[tuple[str, ...], Group] = {}
    for job in jobs:
        values = tuple(job.overrides.get(key, "(default)") for key in keys)
        groups.setdefault(values, Group(dict(zip(keys, values)), [])).jobs.append(job)
    return [groups[values] for values in sorted(groups, key=lambda vs: tuple(_value_key(v) for v in vs))]


def _skills(jobs: Sequence[JobResult]) -> list[str]:
    return sorted({skill for job in jobs for skill in job.skills})


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def render_markdown(title: str, jobs: Sequence[JobResult], groups: Sequence[Group], image: str | None) -> str:
    """The sweep as markdown: one row per job, replicate means, the heatmap, then the jobs without results."""
    keys = varying_keys(jobs)
    skills = _skills(jobs)
    missing = [job for job in jobs if job.problem is not None]
    lines = [f"# {title}", ""]
    lines.append(f"{len(jobs)} jobs, {len(jobs) - len(missing)} with held-out accuracy"
                 + (f", {len(missing)} without (listed at the end)" if missing else "")
                 + (f". Varying: {', '.join(f'`{k}`' for k in keys)}." if keys else "."))
    lines.append("")
    header = ["job", *keys, "overall", *skills, "loss", "step"]
    lines += [_md_row(header), "|" + "---|" * len(header)]
    chance = next((job.chance for job in jobs if job.chance), {})
    if chance:
        cells = ["chance", *[""] * (len(keys) + 1), *(_fmt(chance.get(s)) for s in skills), "", ""]
        lines.append(_md_row(cells))
    for job in jobs:
        cells = [job.name, *(job.overrides.get(k, "(default)") for k in keys), _fmt(job.overall),
                 *(_fmt(job.skills.get(s)) for s in skills), _fmt(job.loss, 4), "" if job.step is None else str(job.step)]
        lines.append(_md_row(cells))
    if any(len(group.jobs) > 1 for group in groups):
        seeds = [k for k in SEED_KEYS if k in keys]
        names = [k for k in keys if k not in SEED_KEYS]
        lines += ["", f"## Mean ± std over {', '.join(f'`{k}`' for k in seeds) or 'repeated jobs'}", ""]
        header = [*(names or ["group"]), "jobs", "overall", *skills]
        lines += [_md_row(header), "|" + "---|" * len(header)]
        for group in groups:
            scored = len(group.scores("overall"))
            count = f"{scored}" if scored == len(group.jobs) else f"{scored} of {len(group.jobs)}"
            cells = [*(group.values.values() or [group.label]), count,
                     *(_mean_std(group.scores(metric)) for metric in ["overall", *skills])]
            lines.append(_md_row(cells))
    if image:
        lines += ["", f"![held-out accuracy per skill]({image})"]
    if missing:
        lines += ["", "## Jobs without results", ""]
        for job in missing:
            values = ", ".join(f"{k}={job.overrides.get(k, '(default)')}" for k in keys)
            lines.append(f"- `{job.name}`{f' ({values})' if values else ''}: {job.problem}")
    return "\n".join(lines) + "\n"


def render_csv(jobs: Sequence[JobResult]) -> str:
    """One row per job: its varying overrides, overall and per-skill accuracy, loss, step and problem."""
    keys, skills = varying_keys(jobs), _skills(jobs)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["job", *keys, "overall", *skills, "loss", "step", "problem"])
    for job in jobs:
        writer.writerow([job.name, *(job.overrides.get(k, "") for k in keys), job.overall,
                         *(job.skills.get(s) for s in skills), job.loss, job.step, job.problem or ""])
    return buffer.getvalue()


def plot_heatmap(path: Path, groups: Sequence[Group], skills: Sequence[str]) -> Path | None:
    """Mean accuracy per group (rows) and skill (columns, then overall), annotated; None when nothing scored."""
    rows = [group for group in groups if group.scores("overall")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [*skills, "overall"]
    grid = [[statistics.fmean(scores) if (scores := g.scores(c)) else math.nan for c in columns] for g in rows]
    labels = [f"{g.label} (n={len(g.scores('overall'))})" for g in rows]
    width = 2.5 + 0.75 * len(columns) + 0.065 * max(len(label) for label in labels)
    fig, ax = plt.subplots(figsize=(width, 1.6 + 0.45 * len(rows)))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for r, values in enumerate(grid):
        for c, value in enumerate(values):
            if not math.isnan(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_title("held-out accuracy" + (" (mean over seeds)" if any(len(g.jobs) > 1 for g in rows) else ""), fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def collate_sweep(sweep_dir: Path, title: str | None = None) -> list[JobResult]:
    """Write ``sweep_summary.csv``, ``.md`` and ``.png`` into ``sweep_dir``; return one result per job folder."""
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(job_dir, sweep_dir) for job_dir in sweep_jobs(sweep_dir)]
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job folders (none has .hydra/overrides.yaml); is it a sweep folder?")
    groups = group_jobs(jobs)
    plot = plot_heatmap(sweep_dir / "sweep_summary.png", groups, _skills(jobs))
    atomic_write_text(sweep_dir / "sweep_summary.csv", render_csv(jobs))
    markdown = render_markdown(title or f"Sweep summary ({sweep_dir})", jobs, groups, plot.name if plot else None)
    atomic_write_text(sweep_dir / "sweep_summary.md", markdown)
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_core.train.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the folder of a train.py -m sweep (hydra.sweep.dir)")
    parser.add_argument("--title", default=None, help="the markdown's heading (default: the folder)")
    args = parser.parse_args(argv)
    try:
        jobs = collate_sweep(args.sweep_dir, args.title)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    missing = [job for job in jobs if job.problem]
    print(f"{len(jobs)} jobs ({len(missing)} without results) → {args.sweep_dir / 'sweep_summary.md'}")
    for job in missing:
        print(f"  {job.name}: {job.problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
