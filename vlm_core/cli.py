"""Hydra glue for the entry points, and the only module below them that imports hydra or omegaconf.

``register_configs`` puts the typed schema into Hydra's ConfigStore, so the YAML under ``conf/`` is
merged onto dataclasses and a wrongly typed override fails before anything runs. ``to_job_config``
converts the composed config once, into the dataclasses that every other module receives.
``register_curate_configs`` and ``to_curate_config`` do the same for ``curate.py``, and
``register_metabolize_configs`` and ``to_metabolize_config`` for ``metabolize.py``, whose sweeps
:class:`SweepSummaryCallback` collates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from curation.config import CurateConfig
from vlm_core.config import JobConfig
from vlm_core.loop.config import MetabolizeConfig

T = TypeVar("T")


def register_configs() -> None:
    """Register the schema that ``conf/config.yaml`` names first in its defaults list."""
    _store(JobConfig, "job_schema")


def register_curate_configs() -> None:
    """Register the schema that ``conf/curate.yaml`` names first in its defaults list."""
    _store(CurateConfig, "curate_schema")


def register_metabolize_configs() -> None:
    """Register the schema that ``conf/metabolize.yaml`` names first in its defaults list."""
    _store(MetabolizeConfig, "metabolize_schema")


def _store(schema_class: type, name: str) -> None:
    """Put ``schema_class`` into Hydra's ConfigStore as ``name``: derived fields unset, user-keyed dicts open."""
    schema = OmegaConf.structured(schema_class)
    _unresolve_derived(schema)
    _open_dicts(schema)
    ConfigStore.instance().store(name=name, node=schema)


def _open_dicts(node: DictConfig) -> None:
    """Let user-keyed dict fields (``mixture.weights``, ``sources``) take new keys without Hydra's ``+``.

    Hydra locks the composed config (struct mode), so ``mixture.weights.ocr=0.2`` would otherwise fail with
    "Key 'ocr' is not in struct". Dataclass fields stay locked, so a misspelt field still fails, and the
    values are still checked against the dict's value type.
    """
    for key in node:
        child = node._get_node(key)
        if not isinstance(child, DictConfig):
            continue
        if OmegaConf.get_type(child) is dict:
            OmegaConf.set_struct(child, False)
        else:
            _open_dicts(child)


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


def _to_object(cfg: DictConfig, schema_class: type[T], source: str, schema: str) -> T:
    """``OmegaConf.to_object``, checked to be ``schema_class`` (the YAML ``source`` must start from ``schema``)."""
    value = OmegaConf.to_object(cfg)
    if not isinstance(value, schema_class):
        raise TypeError(f"{source} must start from {schema}; got {type(value).__name__}")
    return value


def _hydra_output_dir() -> str | None:
    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Convert the composed config into a :class:`JobConfig` and record Hydra's output dir as ``run_dir``."""
    job = _to_object(cfg, JobConfig, "conf/config.yaml", "job_schema")
    if job.run_dir is None:
        job.run_dir = _hydra_output_dir()
    return job


def to_curate_config(cfg: DictConfig) -> CurateConfig:
    """Convert the composed ``conf/curate.yaml`` into a :class:`CurateConfig`."""
    return _to_object(cfg, CurateConfig, "conf/curate.yaml", "curate_schema")


def to_metabolize_config(cfg: DictConfig) -> MetabolizeConfig:
    """Convert the composed ``conf/metabolize.yaml``; ``output_dir`` defaults to Hydra's output dir."""
    loop = _to_object(cfg, MetabolizeConfig, "conf/metabolize.yaml", "metabolize_schema")
    if loop.output_dir is None:
        loop.output_dir = _hydra_output_dir()
    return loop


class TrainSweepCallback(Callback):
    """``train.py``'s sweeps: a failed job leaves its error in ``job_failed.txt``; the sweep's end collates every
    job folder into sweep_summary.md, .csv and .png (:mod:`vlm_core.train.sweep`, which also runs by hand)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from vlm_core.train.checkpoint import atomic_write_text
        from vlm_core.train.sweep import FAILED_FILE

        failed = Path(str(config.hydra.runtime.output_dir)) / FAILED_FILE
        if job_return.status == JobStatus.FAILED:
            try:
                job_return.return_value  # re-raises the job's exception
            except Exception as error:  # noqa: BLE001  (recorded for the summary; Hydra reports it too)
                atomic_write_text(failed, f"{type(error).__name__}: {error}\n")
        else:
            failed.unlink(missing_ok=True)  # a job rerun in the same folder: an earlier failure no longer holds

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from vlm_core.train.sweep import collate_sweep

        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = collate_sweep(sweep_dir)
        print(f"sweep summary of {len(jobs)} jobs → {sweep_dir / 'sweep_summary.md'}")


class SweepSummaryCallback(TrainSweepCallback):
    """``metabolize.py``'s sweeps: failed jobs are recorded as in train.py's; at the end of ``-m``, every job's
    rounds.json is collated into sweep_summary.md and .csv (a job without rounds is listed with its reason)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from vlm_core.loop.report import collate
        from vlm_core.train.sweep import sweep_jobs

        sweep_dir = Path(str(config.hydra.sweep.dir))
        runs = sweep_jobs(sweep_dir)
        rows = collate(runs, sweep_dir, title=f"Sweep summary ({sweep_dir})")
        print(f"sweep summary of {len(rows)} runs → {sweep_dir / 'sweep_summary.md'}")
