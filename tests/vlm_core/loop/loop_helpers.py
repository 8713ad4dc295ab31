"""Helpers shared by the loop tests (a module of its own: ``conftest`` names clash across test folders)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from vlm_core.cli import register_metabolize_configs, to_metabolize_config
from vlm_core.loop.config import MetabolizeConfig

CONF = Path(__file__).resolve().parents[3] / "conf"
register_metabolize_configs()


def compose_loop(*overrides: str) -> MetabolizeConfig:
    """``conf/metabolize.yaml`` composed with ``overrides`` and converted, as metabolize.py does."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_metabolize_config(compose(config_name="metabolize", overrides=list(overrides)))
