"""Resolve the configured data source into validated samples and a tokenizer (the I/O edge of training).

For ``data.source=world`` the built-in world is generated once into ``data.cache_dir`` and read back
through the same LLaVA loader as real data; its tokenizer is trained on the world's training text and
cached beside it. For ``data.source=llava`` the given JSON files are read. Bad records go to
``quarantine.jsonl`` in the run directory (or stop the run with ``data.on_bad_record=error``).
For ``data.source=manifest`` the training samples are a curated manifest's rows, expanded by the mixture
weights (``mixture.weights`` overrides the written ones); a manifest curated from the built-in world is
evaluated on the world's held-out split with the world's oracle, like ``data.source=world``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from curation.sources.world import (
    WorldPaths,
    build_world,
    chance_level,
    check_answer,
    load_scenes,
    normalize,
)
from curation.sources.world.config import WorldConfig
from curation.sources.world.scene import Scene
from vlm_core.config import DataConfig, MixtureConfig
from vlm_core.data.llava import load_llava, write_quarantine
from vlm_core.data.manifest import read_manifest
from vlm_core.data.tokenizer import load_tokenizer, train_tokenizer
from vlm_core.types import QuarantinedRecord, Sample

log = logging.getLogger(__name__)

Scorer = Callable[[Sample, str], float]


@dataclass
class PreparedData:
    """Training and held-out samples, the tokenizer folder, and how to score answers."""

    train: list[Sample]
    eval: list[Sample]
    tokenizer_dir: Path
    scorer: Scorer
    chance: dict[str, float]
    quarantined: list[QuarantinedRecord] = field(default_factory=list)
    world: WorldPaths | None = None
    scenes: dict[str, Scene] = field(default_factory=dict)  # world only: image path relative to its root → scene


def prepare_data(
    cfg: DataConfig, run_dir: Path, show_progress: bool = True, mixture: MixtureConfig | None = None
) -> PreparedData:
    """Build or load the data of a run; write the quarantine list into ``run_dir``.

    ``mixture`` (the job's top-level ``mixture`` config) re-weighs the sources of ``data.source=manifest``.
    """
    strict = cfg.on_bad_record == "error"
    cache_dir = Path(cfg.cache_dir).expanduser()
    if cfg.source == "world":
        world = build_world(cfg.world, cache_dir, show_progress=show_progress)
        train, bad_train = load_llava(world.train_json, world.image_root, source="world/train", strict=strict)
        held_out, bad_eval = load_llava(world.eval_json, world.image_root, source="world/eval", strict=strict)
        scenes = load_scenes(world)
        tokenizer_dir = _world_tokenizer(cfg, world, train)
        scorer = _world_scorer(world, scenes)
        chance = {skill: chance_level(skill, cfg.world) for skill in cfg.world.skills}
    elif cfg.source == "manifest":
        return _prepare_manifest(cfg, run_dir, show_progress, mixture)
    else:
        image_root = Path(cfg.image_root).expanduser()
        train, bad_train = load_llava(Path(cfg.train_json).expanduser(), image_root, strict=strict)
        held_out, bad_eval = [], []
        if cfg.eval_json:
            held_out, bad_eval = load_llava(Path(cfg.eval_json).expanduser(), image_root, strict=strict)
        world, scenes = None, {}
        tokenizer_dir = _external_tokenizer(cfg, run_dir, train)
        scorer = exact_match_scorer
        chance = {}
    quarantined = bad_train + bad_eval
    write_quarantine(quarantined, run_dir / "quarantine.jsonl")
    if quarantined:
        log.warning(
            "%d record(s) failed validation and were quarantined (reasons in %s); first: %s",
            len(quarantined), run_dir / "quarantine.jsonl", quarantined[0].reason,
        )
    if not train:
        raise ValueError(f"no valid training records in data.source={cfg.source}; see {run_dir / 'quarantine.jsonl'}")
    log.info("data: %d training samples, %d held-out samples, tokenizer %s", len(train), len(held_out), tokenizer_dir)
    return PreparedData(train, held_out, tokenizer_dir, scorer, chance, quarantined, world, scenes)


def _prepare_manifest(
    cfg: DataConfig, run_dir: Path, show_progress: bool, mixture: MixtureConfig | None
) -> PreparedData:
    """Training samples from a curated manifest; held-out data and scoring from its world, if it has one."""
    manifest = read_manifest(Path(cfg.path))
    mixture = mixture or MixtureConfig()
    train = manifest.mixture(mixture.weights, mixture.seed)
    log.info("manifest %s: %d rows in %s → %d training samples with weights %s", cfg.path,
             sum(len(rows) for rows in manifest.samples.values()), sorted(manifest.samples), len(train),
             {name: mixture.weights.get(name, weight) for name, weight in manifest.weights.items()})
    write_quarantine([], run_dir / "quarantine.jsonl")  # curation already quarantined (see its quarantine.jsonl)
    if not train:
        raise ValueError(f"data.path={cfg.path}: the mixture is empty (every weight 0 or no rows)")
    world_dict = manifest.metadata.get("world")
    if not world_dict:
        held_out: list[Sample] = []
        if cfg.eval_json:
            held_out, _ = load_llava(Path(cfg.eval_json).expanduser(), Path(cfg.image_root or ".").expanduser())
        return PreparedData(train, held_out, _external_tokenizer(cfg, run_dir, train), exact_match_scorer, {})
    world_cfg = WorldConfig(**world_dict)
    world = build_world(world_cfg, Path(cfg.cache_dir).expanduser(), show_progress=show_progress)
    held_out, _ = load_llava(world.eval_json, world.image_root, source="world/eval")
    view, scenes = _world_view(world, manifest.metadata)
    tokenizer_dir = _world_tokenizer(cfg, world, [])
    chance = {skill: chance_level(skill, world_cfg) for skill in world_cfg.skills}
    log.info("data: %d training samples from the manifest, %d held-out world samples", len(train), len(held_out))
    return PreparedData(train, held_out, tokenizer_dir, _world_scorer(view, scenes), chance, [], view, scenes)


def _world_view(world: WorldPaths, metadata: dict) -> tuple[WorldPaths, dict[str, Scene]]:
    """The world's paths with an image root that also covers the manifest's derived images (the dirty world's),
    and every known scene keyed relative to it: stage 0/1 and the oracle look scenes up by that key."""
    roots = {world.image_root.resolve(): load_scenes(world)}
    for lineage in (metadata.get("sources") or {}).values():
        scenes_file, image_root = lineage.get("scenes"), lineage.get("image_root")
        if scenes_file and image_root and Path(image_root).resolve() not in roots:
            roots[Path(image_root).resolve()] = load_scenes(dataclasses.replace(world, scenes=Path(scenes_file)))
    common = Path(os.path.commonpath([str(root) for root in roots]))
    scenes = {
        (root / key).relative_to(common).as_posix(): scene for root, table in roots.items() for key, scene in table.items()
    }
    view = WorldPaths(world.dir, world.train_json, world.eval_json, common, world.scenes, world.config_hash)
    return view, scenes


def _world_tokenizer(cfg: DataConfig, world: WorldPaths, train: list[Sample]) -> Path:
    if cfg.tokenizer.path:
        return Path(cfg.tokenizer.path).expanduser()
    folder = world.dir / f"tokenizer-v{cfg.tokenizer.vocab_size}"
    if not (folder / "tokenizer.json").is_file():
        if not train:  # a manifest run: the world's tokenizer is trained on the clean world's text, as for source=world
            train, _ = load_llava(world.train_json, world.image_root, source="world/train")
        log.info("training a %d-token BPE tokenizer on the world's text → %s", cfg.tokenizer.vocab_size, folder)
        train_tokenizer(_texts(train), folder, vocab_size=cfg.tokenizer.vocab_size)
    load_tokenizer(folder)  # fail here, with the folder named, rather than mid-training
    return folder


def _external_tokenizer(cfg: DataConfig, run_dir: Path, train: list[Sample]) -> Path:
    if cfg.tokenizer.path:
        return Path(cfg.tokenizer.path).expanduser()
    folder = run_dir / "tokenizer"
    train_tokenizer(_texts(train), folder, vocab_size=cfg.tokenizer.vocab_size)
    return folder


def _texts(samples: list[Sample]) -> list[str]:
    return [turn.text for sample in samples for turn in sample.turns]


def _world_scorer(world: WorldPaths, scenes: dict[str, Scene]) -> Scorer:
    """Score against the scene graph (the world's exact oracle), not against a stored answer string."""
    root = world.image_root.resolve()

    def score(sample: Sample, answer: str) -> float:
        key = sample.image_paths[0].resolve().relative_to(root).as_posix()
        question_meta = sample.meta["questions"][-1]
        return check_answer(sample.skill, scenes[key], question_meta, answer)

    return score


def exact_match_scorer(sample: Sample, answer: str) -> float:
    """Normalised exact match (the world oracle's normalisation) against the last assistant turn."""
    return float(normalize(answer) == normalize(sample.turns[-1].text))
