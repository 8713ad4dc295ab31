"""The loop's outputs: rounds.json, report.md with PNG plots, TensorBoard scalars per round, sweep summaries."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm_core.train.checkpoint import atomic_write_text
from vlm_core.train.sweep import failure_reason

log = logging.getLogger(__name__)


def write_outputs(out: Path, history: Sequence[dict[str, Any]]) -> None:
    """rounds.json, plots/ and report.md for one loop run (rewritten after every round)."""
    atomic_write_text(out / "rounds.json", json.dumps(list(history), indent=1))
    plots = plot_run(out / "plots", history)
    atomic_write_text(out / "report.md", render_report(history, plots, out))


def _skills(history: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({skill for record in history for skill in record["skills"]})


def plot_run(folder: Path, history: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """accuracy.png (per skill over rounds), mixture.png (composition by skill), budget.png (the plan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rounds = [r["round"] for r in history]
    skills = _skills(history)
    paths = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for skill in skills:
        ax.plot(rounds, [r["skills"].get(skill, float("nan")) for r in history], marker="o", label=skill)
    ax.plot(rounds, [r["overall"] for r in history], color="black", linestyle="--", label="mean")
    ax.set(xlabel="round", ylabel="held-out accuracy", ylim=(0, 1.02), xticks=rounds,
           title=f"per-skill accuracy ({history[-1]['strategy'] if history else ''})")
    ax.legend(fontsize=7, ncol=3)
    paths["accuracy"] = _save(fig, folder / "accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(history)
    for skill in skills:
        values = [((r.get("mixture") or {}).get("samples_by_skill") or {}).get(skill, 0.0) for r in history]
        ax.bar(rounds, values, bottom=bottom, label=skill)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="round", ylabel="expected training samples", xticks=rounds,
           title="mixture composition by skill (round 0: the whole pool)")
    ax.legend(fontsize=7, ncol=3)
    paths["mixture"] = _save(fig, folder / "mixture.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(history)
    for skill in skills:
        values = [float((r.get("plan") or {}).get(skill, 0)) for r in history]
        ax.bar(rounds, values, bottom=bottom, label=skill)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="round", ylabel="new samples planned", xticks=rounds, title="budget split per round")
    ax.legend(fontsize=7, ncol=3)
    paths["budget"] = _save(fig, folder / "budget.png")
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_report(history: Sequence[dict[str, Any]], plots: dict[str, Path], out: Path) -> str:
    skills = _skills(history)
    lines = ["# Data-metabolism loop", ""]
    if history:
        total = sum(r.get("wall_s", 0) for r in history)
        # The last round's strategy: round 0 may be shared between strategies (see benchmarks/exp_metabolize.py).
        lines += [f"Strategy `{history[-1]['strategy']}`, seed {history[-1]['seed']}, {len(history)} rounds done "
                  f"({total:.0f} s).", ""]
    lines += ["## Held-out accuracy per round", "",
              "| round | " + " | ".join(skills) + " | mean | caption halluc. | wall s |",
              "|---|" + "---|" * (len(skills) + 3)]
    for r in history:
        rate = r.get("caption_hallucination_rate")
        lines.append(f"| {r['round']} | " + " | ".join(f"{r['skills'].get(s, float('nan')):.3f}" for s in skills)
                     + f" | {r['overall']:.3f} | {'-' if rate is None else f'{rate:.3f}'} | {r.get('wall_s', 0):.0f} |")
    lines += ["", "## Budget split and weaknesses", ""]
    for r in history:
        weak = (r.get("analysis") or {}).get("weaknesses", [])[:3]
        plan = ", ".join(f"{s} {n}" for s, n in sorted((r.get("plan") or {}).items(), key=lambda x: -x[1]) if n)
        lines.append(f"- round {r['round']}: planned [{plan or 'nothing'}]; weakest after it: {', '.join(weak)}")
        confusions = ((r.get("analysis") or {}).get("categories") or {})
        worst = weak[0] if weak else None
        if worst and confusions.get(worst, {}).get("confusions"):
            pairs = "; ".join(f"{ref} → {ans} ×{n}" for ref, ans, n in confusions[worst]["confusions"][:3])
            lines.append(f"  - {worst} confusions (reference → answer): {pairs}")
        for name, made in (r.get("generated") or {}).items():
            if made.get("oracle_agreement"):
                shares = ", ".join(f"{s} {a:.2f}" for s, a in sorted(made["oracle_agreement"].items()))
                lines.append(f"  - {name} labels the oracle accepts: {shares}")
    lines += ["", "## Curation per round", "",
              "| round | kept per source | removed (reason: count) | refill passes |", "|---|---|---|---|"]
    for r in history[1:]:
        curation = r.get("curation") or {}
        kept = ", ".join(f"{source} {n}" for source, n in (curation.get("kept") or {}).items()) or "-"
        removed = "; ".join(f"{reason}: {n}" for reason, n in (curation.get("removed") or {}).items()) or "nothing"
        lines.append(f"| {r['round']} | {kept} | {removed} | {curation.get('refill_passes', 0)} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({path.relative_to(out).as_posix()})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def write_tensorboard(folder: Path, history: Sequence[dict[str, Any]]) -> None:
    """Scalars per round: accuracy/<skill>, plan/<skill>, mixture/<skill>, caption_hallucination_rate."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))  # called once per finished round, with that round's record
    try:
        for r in history:
            step = r["round"]
            for skill, value in r["skills"].items():
                writer.add_scalar(f"accuracy/{skill}", value, step)
            writer.add_scalar("accuracy/mean", r["overall"], step)
            for skill, n in (r.get("plan") or {}).items():
                writer.add_scalar(f"plan/{skill}", n, step)
            for skill, n in ((r.get("mixture") or {}).get("samples_by_skill") or {}).items():
                writer.add_scalar(f"mixture/{skill}", n, step)
            if r.get("caption_hallucination_rate") is not None:
                writer.add_scalar("caption_hallucination_rate", r["caption_hallucination_rate"], step)
    finally:
        writer.close()


# --- sweeps -----------------------------------------------------------------------------------------------


def summary_row(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One run of a sweep: its final per-skill accuracy, the gain on round 0's weakest skill, and the mean.

    The strategy and seed are the last round's (round 0 may be shared between strategies, see exp_metabolize).
    """
    first, last = history[0], history[-1]
    weakest = min(first["scores"], key=lambda s: (first["scores"][s], s))
    row: dict[str, Any] = {
        "strategy": last["strategy"], "seed": last["seed"], "rounds": last["round"],
        "weakest_skill": weakest, "weakest_round0": first["skills"][weakest], "weakest_final": last["skills"][weakest],
        "mean_round0": first["overall"], "mean_final": last["overall"],
        "halluc_round0": first.get("caption_hallucination_rate"), "halluc_final": last.get("caption_hallucination_rate"),
        "wall_s": round(sum(r.get("wall_s", 0) for r in history), 1),
    }
    row.update({f"final_{skill}": value for skill, value in sorted(last["skills"].items())})
    return row


def collate(run_dirs: Sequence[Path], out: Path, title: str = "Sweep summary") -> list[dict[str, Any]]:
    """Collate the rounds.json of several runs into ``out``/sweep_summary.csv and .md (means per strategy).

    A run without rounds yet has no row; the markdown lists it with the reason (its ``job_failed.txt`` if the
    sweep's callback recorded an error)."""
    rows, missing = [], []
    for run_dir in sorted(map(Path, run_dirs)):
        path = run_dir / "rounds.json"
        history = json.loads(path.read_text()) if path.is_file() else []
        if history:
            rows.append({"run_dir": str(run_dir), **summary_row(history)})
        else:
            missing.append((str(run_dir), failure_reason(run_dir, "no round finished (no rounds.json): killed, "
                                                                  "still running or failed")))
    out.mkdir(parents=True, exist_ok=True)
    columns = sorted({key for row in rows for key in row}, key=lambda k: (k.startswith("final_"), k != "strategy", k))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "sweep_summary.csv", buffer.getvalue())
    atomic_write_text(out / "sweep_summary.md", render_summary(rows, title, missing))
    return rows


def render_summary(rows: Sequence[dict[str, Any]], title: str, missing: Sequence[tuple[str, str]] = ()) -> str:
    """The table per run and the means per strategy; then the runs without results, each with its reason."""
    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [f"# {title}", "", f"{len(rows)} runs" + (f", {len(missing)} without results (listed at the end)."
                                                      if missing else "."), ""]
    tail = ["", "## Runs without results", "", *(f"- `{run}`: {reason}" for run, reason in missing)] if missing else []
    if not rows:
        return "\n".join(lines + tail) + "\n"
    keys = ["strategy", "seed", "weakest_skill", "weakest_round0", "weakest_final", "mean_round0", "mean_final",
            "halluc_round0", "halluc_final", "wall_s"]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in rows]
    lines += ["", "## Mean over seeds", "", "| strategy | runs | weakest final | mean final |", "|---|---|---|---|"]
    for strategy in sorted({row["strategy"] for row in rows}):
        group = [row for row in rows if row["strategy"] == strategy]
        weakest = sum(r["weakest_final"] for r in group) / len(group)
        mean = sum(r["mean_final"] for r in group) / len(group)
        lines.append(f"| {strategy} | {len(group)} | {weakest:.3f} | {mean:.3f} |")
    return "\n".join(lines + tail) + "\n"
