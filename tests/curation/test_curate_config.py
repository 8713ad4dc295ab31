"""Every YAML of conf/curate/ composes into CurateConfig; mixture weights override from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from curation.config import CurateConfig
from vlm_core.cli import (
    register_configs,
    register_curate_configs,
    to_curate_config,
    to_job_config,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
register_configs()
register_curate_configs()
REQUIRED = {"llava": ["sources.llava.path=/tmp/x.json", "sources.llava.image_root=/tmp/images"]}


def compose_curate(overrides: list[str]) -> CurateConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_curate_config(compose(config_name="curate", overrides=overrides))


def options() -> list[tuple[str, str]]:
    return [(path.parent.name, path.stem) for path in sorted((CONF / "curate").glob("*/*.yaml"))]


@pytest.mark.parametrize(("group", "option"), options(), ids=lambda v: str(v))
def test_every_curate_yaml_composes(group: str, option: str) -> None:
    cfg = compose_curate([f"curate/{group}={option}", *REQUIRED.get(option, [])])
    assert isinstance(cfg, CurateConfig) and cfg.sources


def test_default_is_the_dirty_world_with_every_stage() -> None:
    cfg = compose_curate([])
    assert cfg.sources["world"].kind == "dirty_world" and cfg.semantic.enabled and cfg.balance.concepts
    off = compose_curate(["curate/stages=validate_only"])
    assert not any(stage.enabled for stage in (off.exact, off.near, off.semantic, off.quality, off.balance))


def test_source_preset_and_weights_without_plus() -> None:
    # A new source comes from a preset (or a YAML of your own under conf/curate/source/); OmegaConf cannot
    # build a typed SourceConfig from command-line keys alone. Weights take new keys without '+'.
    cfg = compose_curate(["curate/source=llava", *REQUIRED["llava"], "mixture.weights.llava=0.25"])
    assert cfg.sources["llava"].kind == "llava" and cfg.mixture.weights == {"llava": 0.25}


@pytest.mark.parametrize(("override", "field"), [
    ("semantic.epsilon=1.5", "semantic.epsilon"),
    ("balance.tags=[colour]", "balance.tags"),
    ("mixture.weights.nowhere=0.5", "mixture.weights"),
    ("near.max_hamming=500", "near.max_hamming"),
])
def test_bad_curate_value_names_the_field(override: str, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        compose_curate([override])


def test_train_mixture_weights_override_and_manifest_data() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        job = to_job_config(compose(config_name="config", overrides=["data=manifest", "mixture.weights.ocr=0.2"]))
    assert job.data.source == "manifest" and job.data.path == "curated/manifest.parquet"
    assert job.mixture.weights == {"ocr": 0.2}
    with pytest.raises(ConfigCompositionException):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name="config", overrides=["mixture.weights.ocr=lots"])
