"""Writing the world: LLaVA JSON structure, determinism of the bytes, and the build cache."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.sources.world import (
    SKILLS,
    WorldConfig,
    WorldGenerator,
    build_world,
    check_answer,
    config_hash,
    load_scenes,
    to_llava,
)
from curation.sources.world import writer
from curation.sources.world.writer import COMPLETE_MARKER


def tiny_config(**overrides) -> WorldConfig:
    return WorldConfig(**{"train_per_skill": 5, "eval_per_skill": 3, "turns_per_record": 3, "train_scale": {}, **overrides})


def folder_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_world_layout_and_llava_structure(tmp_path: Path) -> None:
    cfg = tiny_config()
    paths = build_world(cfg, tmp_path, show_progress=False)
    assert paths.dir == tmp_path / f"world-{config_hash(cfg)}" and (paths.dir / COMPLETE_MARKER).is_file()
    train, evaluation = json.loads(paths.train_json.read_text()), json.loads(paths.eval_json.read_text())
    assert len(train) == len(SKILLS) * 5 and len(evaluation) == len(SKILLS) * 3
    scenes = load_scenes(paths)
    assert len(scenes) == len(train) + len(evaluation)
    for split, rows in (("train", train), ("eval", evaluation)):
        for row in rows:
            assert set(row) == {"id", "image", "conversations", "skill", "meta"}
            assert row["image"] == f"{split}/{row['id']}.png" and row["id"].startswith(f"{split}-{row['skill']}-")
            turns = row["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
            assert turns[0]["value"].endswith("\n<image>")  # image_position="last", the default
            assert sum(t["value"].count("<image>") for t in turns) == 1
            assert len(row["meta"]["questions"]) == len(turns) // 2
            scene = scenes[row["image"]]
            assert row["meta"]["n_objects"] == len(scene.shapes)
            for meta, answer in zip(row["meta"]["questions"], turns[1::2]):
                assert check_answer(row["skill"], scene, meta, answer["value"]) == 1.0
            with Image.open(paths.image_root / row["image"]) as image:
                assert image.size == (64, 64) and image.mode == "RGB"
    saved = json.loads((paths.dir / "world_config.json").read_text())
    assert saved["config_hash"] == paths.config_hash and WorldConfig(**saved["config"]) == cfg
    rows = [json.loads(line) for line in paths.scenes.read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "eval"}


@pytest.mark.parametrize("position", ["first", "last"])
def test_to_llava_puts_the_image_in_the_first_turn_only(position: str) -> None:
    record = WorldGenerator(tiny_config()).request("grounding", 1, seed=3, turns=3)[0]
    row = to_llava(record, "x/y.png", image_position=position)
    assert len(record.questions) > 1 and row["image"] == "x/y.png"
    humans = [t["value"] for t in row["conversations"] if t["from"] == "human"]
    first = record.questions[0].text
    assert humans[0] == (f"<image>\n{first}" if position == "first" else f"{first}\n<image>")
    assert humans[1:] == [q.text for q in record.questions[1:]]
    assert [t["value"] for t in row["conversations"] if t["from"] == "gpt"] == [q.answer for q in record.questions]


def test_to_llava_rejects_an_unknown_image_position() -> None:
    record = WorldGenerator(tiny_config()).request("count", 1, seed=3)[0]
    with pytest.raises(ValueError, match="image_position"):
        to_llava(record, "x/y.png", image_position="middle")


def test_same_config_writes_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    cfg = tiny_config()
    first = build_world(cfg, tmp_path / "a", show_progress=False)
    second = build_world(cfg, tmp_path / "b", show_progress=False)
    assert folder_bytes(first.dir) == folder_bytes(second.dir)
    other = build_world(tiny_config(seed=7), tmp_path / "a", show_progress=False)
    assert other.dir != first.dir
    assert other.train_json.read_bytes() != first.train_json.read_bytes()


def test_complete_world_is_reused_without_regenerating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config()
    paths = build_world(cfg, tmp_path, show_progress=False)
    stamp = paths.train_json.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a complete world must not be regenerated")

    monkeypatch.setattr(writer, "write_records", fail)
    assert build_world(cfg, tmp_path, show_progress=False) == paths
    assert paths.train_json.stat().st_mtime_ns == stamp


def test_world_without_marker_is_rebuilt(tmp_path: Path) -> None:
    cfg = tiny_config()
    paths = build_world(cfg, tmp_path, show_progress=False)
    expected = folder_bytes(paths.dir)
    (paths.dir / COMPLETE_MARKER).unlink()
    paths.train_json.write_text("[]")  # half-written leftovers
    (paths.dir / "stray.txt").write_text("from an interrupted run")
    rebuilt = build_world(cfg, tmp_path, show_progress=False)
    assert rebuilt == paths and folder_bytes(rebuilt.dir) == expected


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # like a user's Ctrl-C half-way through rendering

    monkeypatch.setattr(writer, "render_images", crash)
    with pytest.raises(KeyboardInterrupt):
        build_world(cfg, tmp_path, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_builds_are_removed(tmp_path: Path) -> None:
    cfg = tiny_config()
    digest = config_hash(cfg)
    host = writer.socket.gethostname()
    dead = tmp_path / f".world-{digest}.tmp-{host}-4999999-deadbeef"  # above Linux's pid_max: never alive
    alive = tmp_path / f".world-{digest}.tmp-{host}-{os.getpid()}-cafecafe"
    elsewhere = tmp_path / f".world-{digest}.tmp-other-host-4999999-12345678"
    for folder in (dead, alive, elsewhere):
        folder.mkdir()
    build_world(cfg, tmp_path, show_progress=False)
    assert not dead.exists() and alive.exists() and elsewhere.exists()


def test_parallel_rendering_writes_the_same_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(skills=["count"], train_per_skill=12)
    monkeypatch.setattr(writer, "PARALLEL_MIN_IMAGES", 0)
    monkeypatch.setattr(writer, "RENDER_CHUNK", 4)
    serial = build_world(cfg, tmp_path / "serial", show_progress=False, workers=1)
    parallel = build_world(cfg, tmp_path / "parallel", show_progress=False, workers=2)
    assert folder_bytes(serial.dir) == folder_bytes(parallel.dir)


def test_config_hash_is_stable_and_sensitive() -> None:
    assert config_hash(tiny_config()) == config_hash(tiny_config())
    assert len(config_hash(tiny_config())) == 12
    assert config_hash(tiny_config()) != config_hash(tiny_config(word_prob=0.31))
    assert np.unique([config_hash(tiny_config(seed=s)) for s in range(20)]).size == 20
    assert config_hash(tiny_config(caption_noise=0.2)) != config_hash(tiny_config())


def test_clean_world_hash_predates_caption_noise() -> None:
    # caption_noise was added after worlds were cached: at 0 it is left out, so a clean world keeps the key it
    # had before (the payload of WORLD_CODE_VERSION 2 without the field).
    cfg = tiny_config()
    before = {k: v for k, v in asdict(cfg).items() if k != "caption_noise"}
    payload = json.dumps({"config": before, "code_version": writer.WORLD_CODE_VERSION}, sort_keys=True)
    assert config_hash(cfg) == hashlib.sha256(payload.encode()).hexdigest()[:12]
