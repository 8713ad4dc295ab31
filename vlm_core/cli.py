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
    schema = OmegaConf.structured(JobConfig)
    _unresolve_derived(schema)
    ConfigStore.instance().store(name="job_schema", node=schema)


def _unresolve_derived(node: DictConfig) -> None:
    """Reset fields a dataclass derives in ``__post_init__`` (its ``DERIVED_FIELDS``) back to None.

    Building the schema instantiates the default dataclasses, which resolves e.g. ``model.mlp_hidden``
    from the default ``model.dim``; left in place, that value would survive an override of ``model.dim``.
    """
    for name in getattr(OmegaConf.get_type(node), "DERIVED_FIELDS", ()):
        node[name] = None
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) is not dict:
            _unresolve_derived(child)


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Convert the composed config into a :class:`JobConfig` and record Hydra's output dir as ``run_dir``."""
    job = OmegaConf.to_object(cfg)
    if not isinstance(job, JobConfig):
        raise TypeError(f"conf/config.yaml must start from job_schema; got {type(job).__name__}")
    if job.run_dir is None and HydraConfig.initialized():
        job.run_dir = HydraConfig.get().runtime.output_dir
    return job
