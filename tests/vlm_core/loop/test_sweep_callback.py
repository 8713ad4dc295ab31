"""The presets compose into the typed config, and the Hydra callback collates a sweep into one summary table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from loop_helpers import compose_loop
from omegaconf import OmegaConf

from vlm_core.cli import SweepSummaryCallback
from vlm_core.loop.config import MetabolizeConfig

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[3] / "conf/metabolize/preset").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes(preset: str) -> None:
    cfg = compose_loop(f"metabolize/preset={preset}", "strategy=uniform", "seed=2")
    assert isinstance(cfg, MetabolizeConfig) and cfg.strategy == "uniform" and cfg.seed == 2
    assert cfg.job.model.mlp_hidden is not None  # the job's derived fields are resolved


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
        (tmp_path / name).mkdir()
        (tmp_path / name / "rounds.json").write_text(json.dumps(history))
    (tmp_path / "3_crashed").mkdir()  # a job that wrote nothing is left out, not an error
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    SweepSummaryCallback().on_multirun_end(config=config)
    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert sorted(r["strategy"] for r in rows) == ["adaptive", "none", "uniform"]
    adaptive = next(r for r in rows if r["strategy"] == "adaptive")
    assert adaptive["weakest_skill"] == "spatial" and float(adaptive["weakest_final"]) == 0.8
    assert float(adaptive["mean_final"]) == 0.85 and float(adaptive["final_color"]) == 0.9
    summary = (tmp_path / "sweep_summary.md").read_text()
    assert "| adaptive | 1 | 0.800 | 0.850 |" in summary
