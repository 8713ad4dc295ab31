"""Write the dirty world planned by :mod:`curation.sources.world.dirty` to disk, cached by config; only I/O here.

Layout of ``<root>/dirty-<hash12>/``::

    train.jsonl          LLaVA records, one per line (clean first); broken lines are written as planned
    images/clean/        the clean world's images
    images/planted/      duplicates, blank, corrupt, bomb images and the escaping symlinks
    outside/secret.png   an image outside the image root, which the escaping records point at
    scenes.jsonl         {"image", "scene"} for every image drawn from a scene (blank images: an empty scene)
    truth.jsonl          {"index", "id", "class", "of", "detail"} per record: the ground truth of what was planted
    dirty_config.json    both configs and the hash
    COMPLETE             written last

Built under a temporary name and moved into place with one rename, like the clean world.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import uuid
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from curation.config import DirtyConfig
from curation.sources.world.config import WorldConfig
from curation.sources.world.dirty import ImageSpec, PlannedRecord, plan_dirty_world
from curation.sources.world.render import render_scene
from curation.sources.world.scene import Scene
from curation.sources.world.writer import config_hash as world_hash

DIRTY_CODE_VERSION = 2  # bump when the bytes written for a given config change
COMPLETE_MARKER = "COMPLETE"
BOMB_SIDE = 30_000  # 900 M pixels of 1-bit PNG: ~110 KB on disk, 112 MB of raw rows, 2.7 GB as RGB


@dataclass(frozen=True)
class DirtyPaths:
    """Where a built dirty world lives."""

    dir: Path
    train_json: Path
    image_root: Path
    scenes: Path
    truth: Path
    config_hash: str
    world_hash: str

    @classmethod
    def at(cls, directory: Path, digest: str, clean_hash: str) -> DirtyPaths:
        return cls(directory, directory / "train.jsonl", directory / "images", directory / "scenes.jsonl",
                   directory / "truth.jsonl", digest, clean_hash)


def dirty_hash(world: WorldConfig, dirty: DirtyConfig) -> str:
    payload = json.dumps({"world": world_hash(world), "dirty": asdict(dirty), "code_version": DIRTY_CODE_VERSION},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@lru_cache(maxsize=1)
def bomb_png() -> bytes:
    """A valid 1-bit grayscale PNG of BOMB_SIDE² black pixels: tiny on disk, enormous once decoded."""
    row = b"\x00" * (1 + BOMB_SIDE // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(BOMB_SIDE)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _png(image: Image.Image, compress_level: int = 1) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def image_bytes(spec: ImageSpec, cfg: WorldConfig) -> bytes | None:
    """The file content for ``spec``; None for specs that write no regular file (none, symlink)."""
    if spec.kind == "render":
        return _png(render_scene(spec.scene, cfg), spec.compress_level)
    if spec.kind == "perturb":
        image = render_scene(spec.scene, cfg)
        if spec.variant == "resample":
            (side,) = spec.params
            small = image.resize((side, side), Image.Resampling.BILINEAR)
            return _png(small.resize(image.size, Image.Resampling.BILINEAR))
        if spec.variant == "brightness":
            (percent,) = spec.params
            pixels = np.asarray(image, dtype=np.float32) * (1.0 + percent / 100.0)
            return _png(Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8)))
        if spec.variant == "noise":
            sigma, seed = spec.params
            pixels = np.asarray(image, dtype=np.float32)
            pixels += np.random.default_rng(seed).normal(0.0, sigma, size=pixels.shape)
            return _png(Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=spec.params[0])
        return buffer.getvalue()
    if spec.kind == "blank":
        red, green, blue, seed = spec.params
        size = cfg.image_size
        pixels = np.empty((size, size, 3), dtype=np.int16)
        pixels[:] = (red, green, blue)
        pixels += np.random.default_rng(seed).integers(-1, 2, size=pixels.shape, dtype=np.int16)
        return _png(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    if spec.kind == "corrupt":
        good = _png(render_scene(spec.scene, cfg))
        if spec.variant == "truncated":
            return good[: len(good) * 3 // 5]
        if spec.variant == "garbage":
            return np.random.default_rng(len(good)).integers(0, 256, size=600, dtype=np.uint8).tobytes()
        if spec.variant == "empty":
            return b""
        damaged = bytearray(good)  # bad_crc: one byte flipped inside the IDAT chunk
        start = good.index(b"IDAT") + 8
        damaged[start + (len(good) - start) // 3] ^= 0xFF
        return bytes(damaged)
    if spec.kind == "bomb":
        return bomb_png()
    if spec.kind in ("none", "symlink"):
        return None
    raise ValueError(f"unknown image spec kind {spec.kind!r}")


def _write_source(planned: list[PlannedRecord], cfg: WorldConfig, staged: DirtyPaths, show_progress: bool) -> None:
    lines, scenes, truth = [], [], []
    for index, item in enumerate(tqdm(planned, desc="dirty world: writing", unit="rec", disable=not show_progress)):
        record = item.record
        rel = record.get("image")
        spec = item.image
        if isinstance(rel, str) and spec.kind != "none":
            path = staged.image_root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if spec.kind == "symlink":
                os.symlink(os.path.relpath(staged.dir / "outside" / "secret.png", path.parent), path)
            else:
                path.write_bytes(image_bytes(spec, cfg))
            scene = spec.scene if spec.kind in ("render", "perturb") else None
            if spec.kind == "blank":
                scene = Scene(objects=(), grid=cfg.grid, image_size=cfg.image_size)
            if scene is not None:
                scenes.append(json.dumps({"image": rel, "scene": scene.to_json()}))
        line = item.raw_line if item.raw_line is not None else json.dumps(record, ensure_ascii=False).encode()
        lines.append(line)
        truth.append(json.dumps({"index": index, "id": record.get("id"), "class": item.truth, "of": item.of,
                                 "detail": item.detail}))
    staged.train_json.write_bytes(b"\n".join(lines) + b"\n")
    staged.scenes.write_text("\n".join(scenes) + "\n")
    staged.truth.write_text("\n".join(truth) + "\n")


def build_dirty_world(
    cfg: WorldConfig, dirty: DirtyConfig, root: Path, show_progress: bool = True
) -> DirtyPaths:
    """Plan and write the dirty world of (``cfg``, ``dirty``) under ``root/dirty-<hash12>``; reuse it if complete."""
    root = Path(root).expanduser()
    digest = dirty_hash(cfg, dirty)
    final = root / f"dirty-{digest}"
    paths = DirtyPaths.at(final, digest, world_hash(cfg))
    if (final / COMPLETE_MARKER).is_file():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".dirty-{digest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staged = DirtyPaths.at(tmp, digest, paths.world_hash)
    try:
        (tmp / "outside").mkdir(parents=True)
        staged.image_root.mkdir()
        (tmp / "outside" / "secret.png").write_bytes(_png(Image.new("RGB", (cfg.image_size, cfg.image_size), (255, 0, 0))))
        planned = plan_dirty_world(cfg, dirty, str(final / "outside" / "secret.png"))
        _write_source(planned, cfg, staged, show_progress)
        config = {"world": asdict(cfg), "dirty": asdict(dirty), "config_hash": digest, "world_hash": paths.world_hash}
        (tmp / "dirty_config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
        (tmp / COMPLETE_MARKER).write_text(digest + "\n")
        if final.exists() and not (final / COMPLETE_MARKER).is_file():
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths


def load_truth(path: Path) -> list[dict]:
    """The rows of ``truth.jsonl``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
