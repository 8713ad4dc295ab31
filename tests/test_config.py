"""Every YAML under conf/ composes into the typed JobConfig; bad values fail with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from vlm_core.cli import register_configs, to_job_config
from vlm_core.config import JobConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()

# data=llava has mandatory paths (???); give them so the group composes.
REQUIRED = {"data/llava": ["data.train_json=/tmp/train.json", "data.image_root=/tmp/images"]}


def group_options() -> list[tuple[str, str]]:
    options = []
    for yaml in sorted(CONF.glob("*/*.yaml")):
        if yaml.parent.name == "hydra":
            continue
        options.append((yaml.parent.name, yaml.stem))
    return options


def compose_job(overrides: list[str]) -> JobConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_job_config(compose(config_name="config", overrides=overrides))


def test_groups_found() -> None:
    groups = {group for group, _ in group_options()}
    assert {"data", "model", "train", "eval"} <= groups


@pytest.mark.parametrize(("group", "option"), group_options(), ids=lambda v: str(v))
def test_every_yaml_composes(group: str, option: str) -> None:
    job = compose_job([f"{group}={option}", *REQUIRED.get(f"{group}/{option}", [])])
    assert isinstance(job, JobConfig)
    assert job.model.mlp_hidden is not None and job.model.projector_hidden is not None  # resolved in __post_init__


def test_issue_example_override() -> None:
    job = compose_job(["model=tiny", "train.max_steps=300", "data.world.skills=[color,count]"])
    assert job.train.max_steps == 300
    assert job.data.world.skills == ["color", "count"]


def test_derived_defaults_follow_overrides() -> None:
    job = compose_job(["model.dim=192"])
    assert job.model.projector_hidden == 192
    assert job.model.mlp_hidden == 512  # 8/3 * 192 = 512, already a multiple of 32


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("model.heads=5", "model.dim"),
        ("model.kv_heads=3", "model.heads"),
        ("data.world.skills=[colour]", "data.world.skills"),
        ("train.batch_size=10", "train.batch_size"),
        ("train.trainable=[vision,lm]", "train.trainable"),
        ("data.world.seed=7", "data.world.eval_seed"),
        ("model.attn_impl=magic", "model.attn_impl"),
        ("train.focus_skills=[colour]", "train.focus_skills"),
        ("train.focus_fraction=1.5", "train.focus_fraction"),
        ("train.tower.threads=0", "train.tower.threads"),
    ],
)
def test_bad_value_names_the_field(override: str, field: str) -> None:
    extra = ["train.grad_accum=4"] if override.startswith("train.batch_size") else []
    extra += ["data.world.eval_seed=7"] if override.startswith("data.world.seed") else []
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        compose_job([override, *extra])


def test_wrong_type_fails_before_running() -> None:
    with pytest.raises(ConfigCompositionException, match="train.max_steps=many") as error:
        compose_job(["train.max_steps=many"])
    assert "could not be converted to Integer" in str(error.value.__cause__)
