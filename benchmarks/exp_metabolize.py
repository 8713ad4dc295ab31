"""Experiment: adaptive bad-case sampling vs a uniform split vs no new data, at an equal incremental budget.

For every seed:
1. Round 0 (train.py's recipe as metabolize.py's default preset sets it) runs once, in the ``adaptive`` arm;
   the other arms copy its finished round 0, so all three start from the same weights and evaluation.
2. Each arm runs ``rounds`` rounds of the loop (``vlm_core.loop``): the same budget of new samples per round
   (``none``: zero) and the same number of continued training steps on its mixture.
3. Every arm's rounds.json is collated (``sweep_summary.md``/``.csv``), and the result is written to
   ``benchmarks/results/metabolize_<name>.md`` with a plot: per-skill accuracy over rounds, mean over seeds,
   one panel per strategy; the gain on round 0's weakest skill and on the mean; device, date, commit,
   versions and the command.

    python benchmarks/exp_metabolize.py                                   # 3 strategies x 3 seeds, default preset
    python benchmarks/exp_metabolize.py --seeds 0 --name one_seed
    python benchmarks/exp_metabolize.py --smoke                           # every step at toy sizes (~1-3 min)
    python benchmarks/exp_metabolize.py --override sampler.budget=6000    # any metabolize.py override
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir

from benchmarks.provenance import git_commit
from vlm_core.cli import register_metabolize_configs, to_metabolize_config
from vlm_core.loop.report import collate
from vlm_core.loop.rounds import run_loop

STRATEGIES = ("adaptive", "uniform", "none")


def compose_config(overrides: list[str]):
    register_metabolize_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_metabolize_config(compose(config_name="metabolize", overrides=overrides))


def run_arm(base, strategy: str, seed: int, out: Path, shared_round0: Path | None) -> list[dict]:
    cfg = copy.deepcopy(base)
    cfg.strategy, cfg.seed, cfg.output_dir, cfg.resume = strategy, seed, str(out), True
    if shared_round0 is not None and not (out / "round-0" / "DONE").is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(shared_round0 / "round-0", out / "round-0", dirs_exist_ok=True)
        shutil.copy2(shared_round0 / "pool.parquet", out / "pool.parquet")
    return run_loop(cfg)


def plot(histories: dict[tuple[str, int], list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = [s for s in STRATEGIES if any(k[0] == s for k in histories)]
    skills = sorted({skill for h in histories.values() for r in h for skill in r["skills"]})
    fig, axes = plt.subplots(1, len(strategies), figsize=(5 * len(strategies), 4), sharey=True, squeeze=False)
    for ax, strategy in zip(axes[0], strategies):
        runs = [h for (s, _), h in histories.items() if s == strategy]
        rounds = [r["round"] for r in runs[0]]
        for skill in skills:
            ax.plot(rounds, [sum(h[k]["skills"][skill] for h in runs) / len(runs) for k in range(len(rounds))],
                    marker="o", label=skill)
        ax.plot(rounds, [sum(h[k]["overall"] for h in runs) / len(runs) for k in range(len(rounds))],
                color="black", linestyle="--", label="mean")
        halluc = [[h[k].get("caption_hallucination_rate") for h in runs] for k in range(len(rounds))]
        if all(v is not None for row in halluc for v in row):
            ax.plot(rounds, [sum(row) / len(row) for row in halluc], color="red", linestyle=":", marker="x",
                    label="caption halluc. rate")
        ax.set(title=f"{strategy} ({len(runs)} seeds)", xlabel="round", xticks=rounds, ylim=(0, 1.02))
    axes[0][0].set_ylabel("held-out accuracy / rate (mean over seeds)")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def halluc_table(histories: dict[tuple[str, int], list[dict]]) -> list[str]:
    """Caption hallucination rate per round: one row per run, then the mean over seeds of each strategy."""
    n_rounds = max(len(h) for h in histories.values())
    head = ["| strategy | seed | " + " | ".join(f"round {k}" for k in range(n_rounds)) + " |",
            "|---|---|" + "---|" * n_rounds]

    def cells(values: list[float | None]) -> str:
        return " | ".join("-" if v is None else f"{v:.3f}" for v in values)

    lines = ["## Caption hallucination rate per round", "", *head]
    for (strategy, seed), h in sorted(histories.items(), key=lambda kv: (STRATEGIES.index(kv[0][0]), kv[0][1])):
        lines.append(f"| {strategy} | {seed} | {cells([r.get('caption_hallucination_rate') for r in h])} |")
    for strategy in STRATEGIES:
        runs = [h for (s, _), h in histories.items() if s == strategy]
        if runs:
            means = []
            for k in range(n_rounds):
                values = [h[k].get("caption_hallucination_rate") for h in runs if k < len(h)]
                means.append(None if not values or None in values else sum(values) / len(values))
            lines.append(f"| **{strategy}** | mean | {cells(means)} |")
    return lines + [""]


def render(rows: list[dict], args: argparse.Namespace, wall_s: float, plot_name: str,
           histories: dict[tuple[str, int], list[dict]] | None = None) -> str:
    by = {s: [r for r in rows if r["strategy"] == s] for s in STRATEGIES}

    def mean(strategy: str, key: str) -> float:
        group = by[strategy]
        return sum(r[key] for r in group) / len(group) if group else float("nan")

    lines = [f"# Data-metabolism loop: adaptive vs uniform vs none ({args.label})", "",
             f"- command: `python benchmarks/exp_metabolize.py {' '.join(args.argv)}`",
             f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; commit {git_commit()}",
             (f"- device: {platform.processor() or platform.machine()}, {platform.system()}, Python {platform.python_version()}, "
             f"torch {importlib.metadata.version('torch')}; wall time {wall_s / 60:.1f} min"),
             f"- overrides: {args.override or 'none'}; seeds {args.seeds}",
             *([f"- note: {args.note}"] if args.note else []), "",
             ("Each row is one run; the weakest skill is round 0's lowest score above chance (the same round 0 for "
             "every strategy of a seed)."), "",
             "| strategy | seed | weakest skill | round 0 | final | mean round 0 | mean final | caption halluc. round 0 → final |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h0, h1 = r.get("halluc_round0"), r.get("halluc_final")
        halluc = "-" if h0 is None or h1 is None else f"{h0:.3f} → {h1:.3f}"
        lines.append(f"| {r['strategy']} | {r['seed']} | {r['weakest_skill']} | {r['weakest_round0']:.3f} | "
                     f"{r['weakest_final']:.3f} | {r['mean_round0']:.3f} | {r['mean_final']:.3f} | {halluc} |")
    lines += ["", "## Means over seeds", "", "| strategy | weakest skill, final | mean, final |", "|---|---|---|"]
    for s in STRATEGIES:
        if by[s]:
            lines.append(f"| {s} | {mean(s, 'weakest_final'):.3f} | {mean(s, 'mean_final'):.3f} |")
    if by["adaptive"] and by["uniform"]:
        lines += ["", (f"adaptive − uniform: weakest skill {100 * (mean('adaptive', 'weakest_final') - mean('uniform', 'weakest_final')):+.1f} "
                  f"points, mean {100 * (mean('adaptive', 'mean_final') - mean('uniform', 'mean_final')):+.1f} points "
                  "(the issue's bar: ≥ +10 and ≥ +3).")]
    lines += ["", f"![per-skill accuracy over rounds]({plot_name})", ""]
    if histories:
        lines += halluc_table(histories)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "exp_metabolize")
    parser.add_argument("--name", default=None, help="results file suffix (default: default or smoke)")
    parser.add_argument("--label", default=None,
                        help="results file suffix (default: --name); e.g. a longer run of the same --work and --name")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="the smoke preset: every step at toy sizes")
    parser.add_argument("--override", nargs="*", default=[], help="metabolize.py overrides, e.g. sampler.budget=6000")
    parser.add_argument("--note", default="", help="a line added to the results (e.g. how the runs were scheduled)")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.name = args.name or ("smoke" if args.smoke else "default")
    args.label = args.label or args.name
    overrides = (["metabolize/preset=smoke"] if args.smoke else []) + list(args.override)
    base = compose_config(overrides)
    started = time.perf_counter()
    histories: dict[tuple[str, int], list[dict]] = {}
    work = args.work / args.name
    for seed in args.seeds:
        first = None
        for strategy in args.strategies:
            out = work / f"seed{seed}" / strategy
            histories[(strategy, seed)] = run_arm(base, strategy, seed, out, first)
            first = first or out
    rows = collate([work / f"seed{s}" / st for s in args.seeds for st in args.strategies], work,
                   title=f"exp_metabolize {args.label}")
    args.results.mkdir(parents=True, exist_ok=True)
    plot_name = f"metabolize_{args.label}.png"
    plot(histories, args.results / plot_name)
    text = render(rows, args, time.perf_counter() - started, plot_name, histories)
    (args.results / f"metabolize_{args.label}.md").write_text(text)
    (args.results / f"metabolize_{args.label}.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return rows


if __name__ == "__main__":
    main()
