"""Hydra glue for the entry points, and the only module below them that imports hydra or omegaconf.

``register_configs`` puts the typed schema into Hydra's ConfigStore, so the YAML under ``conf/`` is
merged onto dataclasses and a wrongly typed override fails before anything runs. ``to_job_config``
converts the composed config once, into the dataclasses that every other module receives.
"""

from __future__ import annotations

from typing import TypeVar

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vlm_core.config import JobConfig

T = TypeVar("T")


def register_configs() -> None:
    """Register the schema that ``conf/config.yaml`` names first in its defaults list."""
    ConfigStore.instance().store(name="job_schema", node=JobConfig)


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Convert the composed config into a :class:`JobConfig` and record Hydra's output dir as ``run_dir``."""
    job = OmegaConf.to_object(cfg)
    if not isinstance(job, JobConfig):
        raise TypeError(f"conf/config.yaml must start from job_schema; got {type(job).__name__}")
    if job.run_dir is None and HydraConfig.initialized():
        job.run_dir = HydraConfig.get().runtime.output_dir
    return job
