"""Fixtures of the loop tests: the smoke preset composed through Hydra, a tiny world, one tiny trained model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from loop_helpers import compose_loop

from vlm_core.loop.config import MetabolizeConfig


@pytest.fixture(scope="session")
def loop_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loop-cache")


@pytest.fixture(scope="session")
def smoke_cfg(loop_cache: Path) -> MetabolizeConfig:
    """The smoke preset on one thread, with a session cache: a world of 24 records per skill, a 2-layer model."""
    return compose_loop("metabolize/preset=smoke", f"job.data.cache_dir={loop_cache}", "job.train.threads=1",
                        "job.train.sample_every=0")


@pytest.fixture
def make_cfg(smoke_cfg: MetabolizeConfig, tmp_path: Path):
    def make(**fields) -> MetabolizeConfig:
        cfg = copy.deepcopy(smoke_cfg)
        cfg.output_dir = str(tmp_path / "loop")
        for name, value in fields.items():
            setattr(cfg, name, value)
        return cfg

    return make


@pytest.fixture(scope="session")
def trained_run(smoke_cfg: MetabolizeConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with a tiny model trained for the smoke preset's few steps (real weights, real tokenizer)."""
    from vlm_core.train.job import run_job

    job = copy.deepcopy(smoke_cfg.job)
    job.run_dir = str(tmp_path_factory.mktemp("tiny-run"))
    run_job(job, show_progress=False)
    return Path(job.run_dir)
