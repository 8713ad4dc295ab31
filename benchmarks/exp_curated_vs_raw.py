"""Experiment: training on the curated mixture beats training on the raw dirty mixture at equal steps.

1. Build the dirty world (``curate.py``'s default source: the clean world's training split plus planted
   exact and near duplicates, captions of other pictures, blank/corrupt/bomb images, escaping paths, broken
   records and a 30x over-represented word) and the clean world's held-out split.
2. Pretrain the vision tower once on the *clean* world (stage 0 of train.py, cached). Both arms reuse it,
   as both would start from the same CLIP; what differs is the data of stages 1 and 2.
3. Curate the dirty world twice: ``raw`` (validation only: records that cannot be read at all are
   quarantined, everything else is kept, as a loader must) and ``curated`` (every stage).
4. Train on each manifest with the same recipe and the same number of steps, once per training seed (the
   seed draws the initialisation and the data stream; each seed uses its own stage-0 tower, as train.py
   would), then evaluate on the world's held-out split (exact oracle, per skill). A finished arm (its
   ``eval.json`` written) is reused by a rerun with the same ``--work``.
5. Write ``benchmarks/results/exp_curated_vs_raw.md``: held-out accuracy per skill for both arms, per seed
   and averaged, the curation counts, device, date, commit, versions and the command.

One seed is not enough: on this recipe whether a skill leaves its question prior in stage 2 depends on the
seed (see ``benchmarks/results/recipe_search_cpu.md``), so a single pair of runs measures luck as much as data.

    python benchmarks/exp_curated_vs_raw.py                        # train.py's world and recipe, 3 seeds: ~75 min
    python benchmarks/exp_curated_vs_raw.py --smoke --out /tmp/x.md   # every step at toy sizes (~1-2 minutes)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.provenance import git_commit
from curation.config import CurateConfig, DirtyConfig, SourceConfig
from curation.pipeline import run_curation
from curation.sources.world.config import WORDS, WorldConfig
from curation.sources.world.writer import config_hash as world_hash
from vlm_core.config import (
    AlignStageConfig,
    DataConfig,
    EvalConfig,
    JobConfig,
    TowerStageConfig,
    TrainConfig,
)
from vlm_core.model.config import ModelConfig
from vlm_core.train.job import run_job
from vlm_core.train.tower import tower_cache_key, tower_is_cached


def _versions() -> str:
    names = ("torch", "numpy", "faiss-cpu", "datasketch", "imagehash", "pyarrow")
    out = []
    for name in names:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(out)


def _job(world: WorldConfig, data: DataConfig, train: TrainConfig, evaluation: EvalConfig, run_dir: Path) -> JobConfig:
    job = JobConfig(data=data, model=ModelConfig(), train=train, eval=evaluation, run_dir=str(run_dir))
    job.data.world = world
    return job


def _plot(score, seeds: list[int], skills: list[str], path: Path) -> None:
    """Left: overall held-out accuracy per seed, raw beside curated. Right: each skill's seeds as dots, mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = (("raw", "tab:gray"), ("curated", "tab:green"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [max(len(seeds), 3), len(skills) + 1]})
    x = np.arange(len(seeds))
    for offset, (arm, colour) in zip((-0.2, 0.2), arms):
        left.bar(x + offset, [score(arm, seed, None) for seed in seeds], width=0.4, color=colour, label=arm)
    left.set(xticks=x, xticklabels=[str(seed) for seed in seeds], xlabel="training seed", ylim=(0, 1),
             ylabel="held-out accuracy, overall", title="per seed")
    left.legend()
    names = [*skills, None]
    x = np.arange(len(names))
    for offset, (arm, colour) in zip((-0.2, 0.2), arms):
        values = np.array([[score(arm, seed, skill) for seed in seeds] for skill in names])
        right.bar(x + offset, values.mean(axis=1), width=0.4, color=colour, alpha=0.5)
        for k in range(len(names)):
            right.scatter(np.full(len(seeds), x[k] + offset), values[k], s=10, color=colour, zorder=3)
    right.set(xticks=x, xticklabels=[skill or "overall" for skill in names], ylim=(0, 1.02),
              title=f"per skill: mean (bar) and each of {len(seeds)} seeds (dots)")
    right.tick_params(axis="x", labelrotation=30)  # many seeds leave this panel narrow
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    parser.add_argument("--steps", type=int, default=defaults.max_steps, help="instruction-tuning steps of each arm")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help="stage-2 peak learning rate of both arms; a non-default value gets its own run dirs")
    parser.add_argument("--train-per-skill", type=int, default=WorldConfig.train_per_skill,
                        help="clean training records per skill (default: train.py's world)")
    parser.add_argument("--eval-per-skill", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (towers, runs)")
    parser.add_argument("--curation-seed", type=int, default=0,
                        help="whose stage-0 tower embeds the records for curation; fixed, so that runs of other "
                             "--seeds in the same --work share one curated manifest")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "exp_curated_vs_raw")
    parser.add_argument("--cache-dir", default="~/.cache/vlm-data-metabolism")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "exp_curated_vs_raw.md")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks every step runs, proves nothing")
    parser.add_argument("--note", default="", help="a line added to the results (e.g. other load on the machine)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    world = WorldConfig(train_per_skill=args.train_per_skill, eval_per_skill=args.eval_per_skill)
    tower = TowerStageConfig()
    align = AlignStageConfig()
    train = TrainConfig(max_steps=args.steps, lr=args.lr, sample_every=0)
    recipe = "" if args.lr == defaults.lr else f"-lr{args.lr:g}"  # runs of another recipe never reuse these
    evaluation = EvalConfig()
    if args.smoke:
        world = replace(world, train_per_skill=12, eval_per_skill=4)
        tower, align = TowerStageConfig(steps=4, warmup_steps=1), AlignStageConfig(steps=2, warmup_steps=1)
        steps_given = "--steps" in (argv if argv is not None else sys.argv[1:])
        train = replace(train, max_steps=args.steps if steps_given else 3, warmup_steps=1,
                        log_every=1, ckpt_every=1000)
        evaluation = EvalConfig(limit_per_skill=2, max_new_tokens=8)
    train = replace(train, tower=tower, align=align)
    cache = str(Path(args.cache_dir).expanduser())
    args.work.mkdir(parents=True, exist_ok=True)

    # 2. The towers, pretrained on the clean world (train.py's stage 0, cached by the same key), one per seed.
    #    A tower already in the cache is not run again: invocations for other --seeds that share --work (run
    #    side by side) would otherwise all write the curation seed's run dir at once.
    def tower_in_cache(seed: int) -> Path:
        return Path(cache) / "towers" / tower_cache_key(ModelConfig().vision, world_hash(world), tower, seed)

    for seed in dict.fromkeys([args.curation_seed, *args.seeds]):
        if tower_is_cached(tower_in_cache(seed)):
            continue
        pretrain = replace(train, seed=seed, max_steps=1, warmup_steps=0, align=replace(align, enabled=False))
        run_job(_job(world, DataConfig(source="world", cache_dir=cache), pretrain, EvalConfig(enabled=False),
                     args.work / f"tower-seed{seed}"), show_progress=False)
    tower_dir = tower_in_cache(args.curation_seed)

    # 3. Raw (validation only) and curated manifests of the same dirty world.
    results: dict[str, dict] = {}
    concepts = list(WORDS)
    for arm in ("raw", "curated"):
        cfg = CurateConfig(sources={"world": SourceConfig(kind="dirty_world", world=world, dirty=DirtyConfig())},
                           output_dir=str(args.work / arm), cache_dir=cache, show_progress=False)
        cfg.balance.concepts = concepts
        cfg.embed.tower_dir = str(tower_dir)
        if arm == "raw":
            for stage in (cfg.exact, cfg.near, cfg.semantic, cfg.quality, cfg.balance):
                stage.enabled = False
        curated = run_curation(cfg)
        results[arm] = {"curation": curated.report["counts"], "truth": curated.report["truth"].get("world", {})}

    # 4. Equal steps on each manifest and seed, evaluated on the clean held-out split.
    for seed in args.seeds:
        for arm in ("raw", "curated"):
            run_dir = args.work / f"train-{arm}-seed{seed}{recipe}"
            if not (run_dir / "eval.json").is_file():
                data = DataConfig(source="manifest", path=str(args.work / arm / "manifest.parquet"), cache_dir=cache)
                run_job(_job(world, data, replace(train, seed=seed), evaluation, run_dir), show_progress=False)
            evaluated = json.loads((run_dir / "eval.json").read_text())
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            loss = next((m["loss"] for m in reversed(metrics) if m.get("stage") == "instruct"), float("nan"))
            results[arm].setdefault("runs", {})[seed] = {"eval": evaluated, "final_loss": loss}

    # 5. The results file.
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    def score(arm: str, seed: int, skill: str | None) -> float:
        evaluated = results[arm]["runs"][seed]["eval"]
        return evaluated.get("overall", float("nan")) if skill is None else evaluated.get("skills", {}).get(skill, float("nan"))

    seeds = args.seeds
    skills = sorted({k for arm in results.values() for run in arm["runs"].values() for k in run["eval"].get("skills", {})})
    command = "python benchmarks/exp_curated_vs_raw.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Curated vs raw dirty mixture at equal steps" + (" (SMOKE RUN: toy sizes, proves nothing)" if args.smoke else ""),
        "",
        f"- device: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPU cores",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- commit: {git_commit()}",
        f"- versions: Python {platform.python_version()}, {_versions()}",
        f"- command: `{command.strip()}`",
        (f"- world: {world.train_per_skill} clean training records per skill (train_scale {world.train_scale}) + planted "
        f"defects (DirtyConfig defaults); held out: {world.eval_per_skill} per skill; {train.max_steps} instruction "
        f"steps per arm and seed at peak lr {train.lr:g}, same recipe; training seeds {seeds}, each with its own stage-0 tower pretrained on "
        f"the clean world and shared by both arms; curation embeds with seed {args.curation_seed}'s tower"),
        (f"- wall time of this invocation: {time.perf_counter() - started:.0f} s (arms finished by an earlier "
        "invocation with the same --work are reused, not rerun)"),
    ]
    if args.note:
        lines.append(f"- note: {args.note}")
    lines += ["", "| | raw (validation only) | curated |", "|---|---:|---:|"]
    for key in ("ingested", "quarantined", "removed", "kept"):
        lines.append(f"| records {key} | {results['raw']['curation'][key]} | {results['curated']['curation'][key]} |")
    for seed in seeds:
        lines.append(f"| final training loss, seed {seed} | {results['raw']['runs'][seed]['final_loss']:.4f} | "
                     f"{results['curated']['runs'][seed]['final_loss']:.4f} |")
    header = " | ".join(f"raw s{seed} | curated s{seed}" for seed in seeds)
    lines += ["", f"Held-out accuracy (world oracle), per seed and the mean over {len(seeds)} seed(s):", "",
              f"| skill | {header} | raw mean | curated mean | curated - raw |",
              "|---|" + "---:|" * (2 * len(seeds) + 3)]
    for skill in [*skills, None]:
        per_seed = " | ".join(f"{score('raw', seed, skill):.3f} | {score('curated', seed, skill):.3f}" for seed in seeds)
        a = mean([score("raw", seed, skill) for seed in seeds])
        b = mean([score("curated", seed, skill) for seed in seeds])
        row = f"| {skill or 'overall'} | {per_seed} | {a:.3f} | {b:.3f} | {b - a:+.3f} |"
        lines.append(row if skill else row.replace("| overall |", "| **overall** |"))
    wins = sum(score("curated", seed, None) > score("raw", seed, None) for seed in seeds)
    medians = {arm: statistics.median(score(arm, seed, None) for seed in seeds) for arm in ("raw", "curated")}
    lines += ["", (f"Curated beats raw on the overall held-out accuracy in {wins} of {len(seeds)} seed(s). Median "
                  f"overall over the seeds: raw {medians['raw']:.3f}, curated {medians['curated']:.3f}.")]
    truth = results["curated"]["truth"]
    if truth:
        recall = ", ".join(f"{k} {v:.1%}" for k, v in truth["recall"].items())
        lines += ["", (f"Curation of the curated arm: recall per planted class {recall}; clean records removed "
                      f"{truth['clean_removed_rate']:.2%} ({truth.get('clean_removed_natural_duplicates', 0)} of them "
                      "duplicates of another clean record that the world itself drew).")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_path = args.out.with_suffix(".png")
    _plot(score, seeds, skills, plot_path)
    lines += ["", f"![raw vs curated held-out accuracy]({plot_path.name})"]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
