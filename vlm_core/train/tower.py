"""Stage 0: pretrain the vision tower on per-patch labels from the world's scene graph.

This stands in for the CLIP/SigLIP tower a LLaVA model starts from. Each patch of the tower's grid
covers one cell of the world's layout, and heads predict that cell's colour, shape, size, word, row and
column. The heads are thrown away afterwards; the tower's features carry that information forward.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from curation.sources.world import label_spaces, patch_labels
from curation.sources.world.config import WorldConfig
from curation.sources.world.scene import Scene
from vlm_core.config import TowerStageConfig
from vlm_core.data.image import ImageProcessor
from vlm_core.data.packing import SampleStream
from vlm_core.model.config import VisionConfig
from vlm_core.model.tower_heads import TowerHeads
from vlm_core.model.vision import VisionTower
from vlm_core.train.checkpoint import atomic_write_text
from vlm_core.train.loop import StepOutput

log = logging.getLogger(__name__)

TOWER_CACHE_VERSION = 1  # bump when the stage's recipe changes, so stale cached towers are not reused


class TowerPretrainer(nn.Module):
    """The tower with per-patch classification heads on top."""

    def __init__(self, vision: VisionTower, heads: TowerHeads) -> None:
        super().__init__()
        self.vision = vision
        self.heads = heads

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.vision(images))  # name → [N_img, P, classes]


class TowerSteps:
    """Batches of (images, per-patch labels), decoded once into memory, in a resumable order."""

    def __init__(
        self, scenes: dict[str, Scene], image_root: Path, world: WorldConfig, vision: VisionConfig,
        processor: ImageProcessor, batch_size: int, seed: int, device: torch.device, show_progress: bool = True,
    ) -> None:
        keys = sorted(scenes)
        if not keys:
            raise ValueError("tower pretraining needs world scenes, and none were found")
        images = []
        for key in tqdm(keys, desc="  decode", disable=not show_progress, leave=False):
            images.append(processor.load_uint8(image_root / key))
        self.images = torch.stack(images)  # [N, C, H, W] uint8
        per_head: dict[str, list[np.ndarray]] = {}
        for key in keys:
            for name, values in patch_labels(scenes[key], world, vision.grid).items():
                per_head.setdefault(name, []).append(values)
        self.labels = {name: torch.from_numpy(np.stack(v)) for name, v in per_head.items()}  # name → [N, P]
        self.processor = processor
        self.device = device
        self.stream = SampleStream(len(keys), batch_size, seed)
        self._iter = iter(self.stream)

    def with_stream(self, batch_size: int, seed: int) -> TowerSteps:
        """The same decoded images and labels, drawn in a fresh order (one per stage, so that a stage's
        batches do not depend on whether an earlier stage ran or came from the cache)."""
        twin = copy.copy(self)
        twin.stream = SampleStream(len(self.images), batch_size, seed)
        twin._iter = iter(twin.stream)
        return twin

    def next_step(self) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        index = torch.as_tensor(next(self._iter), dtype=torch.long)
        images = self.processor.normalize(self.images[index]).to(self.device)  # [B, C, H, W] float
        labels = {name: values[index].to(self.device) for name, values in self.labels.items()}
        return [(images, labels)]

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._iter = iter(self.stream)


@torch.no_grad()
def tower_accuracy(model: TowerPretrainer, source: TowerSteps, batch_size: int = 512) -> dict[str, float]:
    """Per-head accuracy over every image of ``source`` (e.g. the held-out split), in eval mode."""
    was_training = model.training
    model.eval()
    correct: dict[str, float] = {}
    for start in range(0, len(source.images), batch_size):
        images = source.processor.normalize(source.images[start : start + batch_size]).to(source.device)
        logits = model(images)
        for name, values in logits.items():
            labels = source.labels[name][start : start + batch_size].to(source.device)
            correct[name] = correct.get(name, 0.0) + float((values.argmax(-1) == labels).sum())
    model.train(was_training)
    patches = source.labels[next(iter(source.labels))].numel()
    accuracy = {f"heldout_acc_{name}": value / patches for name, value in correct.items()}
    accuracy["heldout_acc"] = sum(accuracy.values()) / len(accuracy)
    return accuracy


def tower_loss(model: nn.Module, batch: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> StepOutput:
    images, labels = batch
    loss, accuracy = model.heads.loss(model(images), labels)
    stats = {f"acc_{name}": float(value) for name, value in accuracy.items()}
    stats["images"] = images.shape[0]
    return StepOutput(loss, 1, stats)


def summarize_tower(window: dict[str, float]) -> dict[str, float]:
    accs = {key: value / window["steps"] for key, value in window.items() if key.startswith("acc_")}
    accs["acc"] = sum(accs.values()) / max(1, len(accs))
    accs["images_per_s"] = window["images"] / window["elapsed_s"]
    return accs


def build_pretrainer(vision: VisionTower, world: WorldConfig, vision_cfg: VisionConfig) -> TowerPretrainer:
    if vision_cfg.grid % world.grid:
        raise ValueError(
            f"tower pretraining maps patches to world cells: the patch grid {vision_cfg.grid}x{vision_cfg.grid} "
            f"(model.vision.image_size / patch_size) must be a multiple of data.world.grid={world.grid}"
        )
    return TowerPretrainer(vision, TowerHeads(vision_cfg.dim, label_spaces(world)))


def tower_cache_key(vision: VisionConfig, world_hash: str, stage: TowerStageConfig, seed: int) -> str:
    payload = {
        "vision": asdict(vision), "world": world_hash, "seed": seed, "version": TOWER_CACHE_VERSION,
        "stage": {k: v for k, v in asdict(stage).items() if k != "cache"},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def tower_is_cached(folder: Path) -> bool:
    """Does ``folder`` hold a complete cached tower (weights, and ``info.json``, which save_cached_tower writes last)?"""
    return (folder / "vision.safetensors").is_file() and (folder / "info.json").is_file()


def load_cached_tower(folder: Path, vision: VisionTower) -> dict[str, Any] | None:
    """Load a cached tower into ``vision``; return its recorded metrics, or None if the cache is empty."""
    if not tower_is_cached(folder):
        return None
    vision.load_state_dict(load_file(str(folder / "vision.safetensors")), strict=True)
    return json.loads((folder / "info.json").read_text(encoding="utf-8"))


def save_cached_tower(folder: Path, vision: VisionTower, info: dict[str, Any]) -> None:
    """Write the tower weights first and ``info.json`` last: a folder without info.json is not a cache hit."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".vision.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in vision.state_dict().items()}, str(tmp))
    tmp.replace(folder / "vision.safetensors")
    atomic_write_text(folder / "info.json", json.dumps(info, indent=1, sort_keys=True))
