"""The Slurm launcher presets under conf/hydra/launcher/ compose onto hydra-submitit-launcher's schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from vlm_core.cli import register_configs, to_job_config
from vlm_core.config import JobConfig

CONF = Path(__file__).resolve().parents[2] / "conf"
PRESETS = sorted(path.stem for path in (CONF / "hydra" / "launcher").glob("*.yaml"))
register_configs()


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes(preset: str) -> None:
    overrides = [f"hydra/launcher={preset}", "parallel.tensor_parallel=2"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        launcher = compose(config_name="config", overrides=overrides, return_hydra_config=True).hydra.launcher
        job = to_job_config(compose(config_name="config", overrides=overrides))
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition and launcher.timeout_min > 10 and launcher.tasks_per_node >= 1
    # submitit counts a signal before min(0.8 * limit, limit - 10 min) as a time-out; the presets must allow
    # requeueing after one (the plugin's default max_num_timeout=0 refuses)
    assert launcher.max_num_timeout >= 1
    assert isinstance(job, JobConfig) and job.parallel.tensor_parallel == 2


def test_presets_found() -> None:
    assert {"slurm_cpu", "slurm_gpu"} <= set(PRESETS)
