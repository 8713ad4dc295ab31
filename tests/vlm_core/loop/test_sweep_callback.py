"""The presets compose into the typed config, and the Hydra callback collates a sweep into one summary table."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from loop_helpers import compose_loop
from omegaconf import OmegaConf

from vlm_core.cli import SweepSummaryCallback
from vlm_core.loop.config import MetabolizeConfig
from vlm_core.train.sweep import FAILED_FILE

ROOT = Path(__file__).resolve().parents[3]
PRESETS = sorted(p.stem for p in (ROOT / "conf/metabolize/preset").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes(preset: str) -> None:
    cfg = compose_loop(f"metabolize/preset={preset}", "strategy=uniform", "seed=2")
    assert isinstance(cfg, MetabolizeConfig) and cfg.strategy == "uniform" and cfg.seed == 2
    assert cfg.job.model.mlp_hidden is not None  # the job's derived fields are resolved


def test_scarce_preset_is_the_default_on_a_small_pool() -> None:
    default, scarce = compose_loop(), compose_loop("metabolize/preset=scarce")
    assert (scarce.job.data.world.train_per_skill, default.job.data.world.train_per_skill) == (1000, 6000)
    assert (scarce.rounds_train.pool_weight, default.rounds_train.pool_weight) == (1.0, 0.15)
    # with those two fields set back, the whole config is the default preset's
    scarce.job.data.world.train_per_skill, scarce.rounds_train.pool_weight = 6000, 0.15
    assert scarce == default


def test_bad_strategy_names_the_field() -> None:
    with pytest.raises(Exception, match="strategy"):
        compose_loop("strategy=greedy")


def fake_history(strategy: str, seed: int, spatial: list[float], mean: list[float]) -> list[dict]:
    return [
        {"round": k, "strategy": strategy, "seed": seed, "skills": {"spatial": s, "color": 0.9},
         "scores": {"spatial": max(0.0, 2 * s - 1), "color": 0.89}, "overall": m, "wall_s": 10.0,
         "caption_hallucination_rate": None}
        for k, (s, m) in enumerate(zip(spatial, mean))
    ]


def test_callback_collates_the_sweep(tmp_path: Path) -> None:
    runs = {"0_adaptive_seed0": fake_history("adaptive", 0, [0.5, 0.7, 0.8], [0.7, 0.8, 0.85]),
            "1_uniform_seed0": fake_history("uniform", 0, [0.5, 0.55, 0.6], [0.7, 0.75, 0.78]),
            "2_none_seed0": fake_history("none", 0, [0.5, 0.5, 0.5], [0.7, 0.7, 0.7])}
    for name, history in runs.items():
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / "rounds.json").write_text(json.dumps(history))
    for name in ("3_crashed", "4_failed"):  # jobs without rounds: no row, listed with their reason, not an error
        (tmp_path / name / ".hydra").mkdir(parents=True)
    (tmp_path / "4_failed" / FAILED_FILE).write_text("RuntimeError: out of memory\n")
    for name in [*runs, "3_crashed", "4_failed"]:
        OmegaConf.save(OmegaConf.create([f"strategy={name.split('_')[1]}"]), tmp_path / name / ".hydra/overrides.yaml")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    SweepSummaryCallback().on_multirun_end(config=config)
    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert sorted(r["strategy"] for r in rows) == ["adaptive", "none", "uniform"]
    adaptive = next(r for r in rows if r["strategy"] == "adaptive")
    assert adaptive["weakest_skill"] == "spatial" and float(adaptive["weakest_final"]) == 0.8
    assert float(adaptive["mean_final"]) == 0.85 and float(adaptive["final_color"]) == 0.9
    summary = (tmp_path / "sweep_summary.md").read_text()
    assert "| adaptive | 1 | 0.800 | 0.850 |" in summary
    assert summary.startswith(f"# Sweep summary ({tmp_path})\n\n3 runs, 2 without results (listed at the end).")
    assert f"- `{tmp_path / '3_crashed'}`: no round finished (no rounds.json)" in summary
    assert f"- `{tmp_path / '4_failed'}`: failed: RuntimeError: out of memory" in summary


@pytest.mark.slow
def test_real_metabolize_sweep_is_collated(smoke_cfg, tmp_path: Path) -> None:
    """``metabolize.py -m`` through Hydra's launcher: both jobs' folders are found and collated at the end."""
    sweep = tmp_path / "sweep"
    command = [sys.executable, "metabolize.py", "-m", "metabolize/preset=smoke", f"hydra.sweep.dir={sweep}",
               f"job.data.cache_dir={smoke_cfg.job.data.cache_dir}", "job.train.threads=1", "generators=[teacher]",
               "rounds=1", "strategy=adaptive,none"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["strategy"]: row for row in csv.DictReader((sweep / "sweep_summary.csv").open())}
    assert sorted(rows) == ["adaptive", "none"]
    for strategy, row in rows.items():
        history = json.loads((Path(row["run_dir"]) / "rounds.json").read_text())
        assert Path(row["run_dir"]).parent == sweep and row["run_dir"].endswith(f"_{strategy}_seed0")
        assert float(row["mean_final"]) == history[-1]["overall"] and row["rounds"] == "1"
    assert "2 runs." in (sweep / "sweep_summary.md").read_text()
