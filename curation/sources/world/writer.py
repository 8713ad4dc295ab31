"""Write the world to disk as LLaVA-format JSON plus PNGs, cached by config; the only module doing I/O.

Layout of a built world, ``<root>/world-<hash12>/``::

    train.json  eval.json        LLaVA JSON lists; "image" is relative to images/
    images/train/<id>.png        one PNG per record
    images/eval/<id>.png
    scenes.jsonl                 {"image": rel_path, "split": ..., "scene": Scene.to_json()} per image
    world_config.json            the config, its hash and the code version
    COMPLETE                     written last; a directory without it is never used

The directory is filled under a temporary sibling name and moved into place with one ``os.replace``, so a
run killed half-way leaves no directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from curation.sources.world.config import IMAGE_POSITIONS, WorldConfig
from curation.sources.world.generator import WorldGenerator, WorldRecord
from curation.sources.world.render import render_scene
from curation.sources.world.scene import Scene

# Bump whenever the bytes written for a given config change (rendering, questions, layout, file format),
# so that cached worlds built by older code are not reused.
WORLD_CODE_VERSION = 2
COMPLETE_MARKER = "COMPLETE"
# zlib level 1: 0.17 ms per 64 px PNG and ~1 KB, vs 0.33 ms and ~0.9 KB at the default level 6 (measured).
PNG_COMPRESS_LEVEL = 1
# Below this many images (~1 s of serial rendering) starting worker processes is not worth it.
PARALLEL_MIN_IMAGES = 4000
RenderTask = tuple[WorldConfig, list[tuple[Scene, str]]]  # the config and (scene, absolute PNG path) pairs
RENDER_CHUNK = 500  # images per worker task: large enough to amortise pickling, small enough for a smooth bar


@dataclass(frozen=True)
class WorldPaths:
    """Where a built world lives. ``image_root`` is the folder the JSON's "image" paths are relative to."""

    dir: Path
    train_json: Path
    eval_json: Path
    image_root: Path
    scenes: Path
    config_hash: str

    @classmethod
    def at(cls, directory: Path, config_hash: str) -> WorldPaths:
        return cls(
            dir=directory,
            train_json=directory / "train.json",
            eval_json=directory / "eval.json",
            image_root=directory / "images",
            scenes=directory / "scenes.jsonl",
            config_hash=config_hash,
        )


def config_hash(cfg: WorldConfig) -> str:
    """A stable 12-hex-digit hash of the config and the code version: the cache key of a built world."""
    config = asdict(cfg)
    if not config["caption_noise"]:
        del config["caption_noise"]  # added later: a clean world keeps the hash it had before the field existed
    payload = json.dumps({"config": config, "code_version": WORLD_CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def image_rel_path(record: WorldRecord) -> str:
    """The record's image path relative to the image root: ``<split>/<id>.png``."""
    return f"{record.split}/{record.id}.png"


def to_llava(record: WorldRecord, image_rel_path: str, image_position: str = "first") -> dict[str, Any]:
    """The record as a LLaVA conversation: ``<image>`` once, in the first human turn; roles alternate.

    ``image_position`` puts the placeholder before the first question ("first") or after it ("last");
    LLaVA-1.5's instruction data has both orders. ``WorldConfig.image_position`` records what each
    order measured.
    """
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(f"image_position={image_position!r}; expected one of {list(IMAGE_POSITIONS)}")
    conversations = []
    for turn, question in enumerate(record.questions):
        text = question.text
        if turn == 0:
            text = f"<image>\n{text}" if image_position == "first" else f"{text}\n<image>"
        conversations.append({"from": "human", "value": text})
        conversations.append({"from": "gpt", "value": question.answer})
    return {
        "id": record.id,
        "image": image_rel_path,
        "conversations": conversations,
        "skill": record.skill,
        "meta": {"questions": [question.meta for question in record.questions], "n_objects": record.n_objects,
                 **({"caption_from": record.caption_from} if record.caption_from else {})},
    }


def _render_chunk(task: RenderTask) -> int:
    """Worker: render and save one chunk of (scene, absolute PNG path). Returns the number written."""
    cfg, items = task
    for scene, path in items:
        render_scene(scene, cfg).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return len(items)


def _chunks(items: Sequence[tuple[Scene, str]], cfg: WorldConfig) -> Iterator[RenderTask]:
    for start in range(0, len(items), RENDER_CHUNK):
        yield cfg, list(items[start : start + RENDER_CHUNK])


def render_images(
    cfg: WorldConfig, items: Sequence[tuple[Scene, str]], workers: int = 1, show_progress: bool = True
) -> None:
    """Render each scene to its PNG path, in ``workers`` processes when there are enough images to pay off."""
    bar = tqdm(total=len(items), desc="world: rendering", unit="img", disable=not show_progress)
    with bar:
        if workers <= 1 or len(items) < PARALLEL_MIN_IMAGES:
            for task in _chunks(items, cfg):
                bar.update(_render_chunk(task))
            return
        # fork where available, like torch's DataLoader: spawn re-imports the caller's __main__, which
        # fails (and the pool respawns its workers forever) when the caller is a REPL or `python - <<EOF`.
        # The children only run PIL and file writes, never the parent's torch/OpenMP thread pools.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            for written in pool.imap_unordered(_render_chunk, _chunks(items, cfg)):
                bar.update(written)


def write_records(
    cfg: WorldConfig,
    records: Sequence[WorldRecord],
    json_path: Path,
    image_root: Path,
    workers: int = 1,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Write ``records`` as a LLaVA JSON list at ``json_path`` with PNGs under ``image_root/<split>/``.

    Returns the ``scenes.jsonl`` rows of the records, for the caller to store next to the JSON.
    """
    items = []
    rows, scene_rows = [], []
    for record in records:
        rel = image_rel_path(record)
        (image_root / record.split).mkdir(parents=True, exist_ok=True)
        items.append((record.scene, str(image_root / rel)))
        rows.append(to_llava(record, rel, cfg.image_position))
        scene_rows.append({"image": rel, "split": record.split, "scene": record.scene.to_json()})
    render_images(cfg, items, workers=workers, show_progress=show_progress)
    json_path.write_text(json.dumps(rows))
    return scene_rows


def _remove_stale_temporaries(root: Path, digest: str) -> None:
    """Delete temporary build folders of this world left by killed runs of this host (their pid is gone)."""
    host = socket.gethostname()
    for tmp in root.glob(f".world-{digest}.tmp-*"):
        parts = tmp.name.split("-")  # .world, <hash>.tmp, <host...>, <pid>, <nonce>
        if len(parts) < 5 or "-".join(parts[2:-2]) != host or not parts[-2].isdigit():
            continue  # another host's build (shared filesystem) may still be running
        try:
            os.kill(int(parts[-2]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # the pid exists (owned by someone else)


def build_world(cfg: WorldConfig, root: Path, show_progress: bool = True, workers: int | None = None) -> WorldPaths:
    """Generate the world of ``cfg`` under ``root/world-<hash12>`` and return its paths; reuse it if complete.

    ``workers`` rendering processes, default min(2, CPUs). The default config (25,200 images) was measured
    on the shared 2-core dev box at 6.2-6.9 s with 2 workers vs 7.4-9.9 s with 1 (~3 s of it generating
    records in this process, the rest rendering and writing PNGs and JSON). While other tenants loaded
    both cores, 2 workers gained nothing (rendering 5.9 s vs 4.7 s serial in one such run).
    Safe against kills (see module docstring) and against two concurrent builds of the same world (the
    second to finish discards its copy).
    """
    root = Path(root).expanduser()
    digest = config_hash(cfg)
    final = root / f"world-{digest}"
    paths = WorldPaths.at(final, digest)
    if (final / COMPLETE_MARKER).is_file():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root, digest)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)

    tmp = root / f".world-{digest}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staged = WorldPaths.at(tmp, digest)
    try:
        staged.image_root.mkdir(parents=True)
        generator = WorldGenerator(cfg)
        scene_rows = write_records(
            cfg, generator.split("train"), staged.train_json, staged.image_root, workers, show_progress
        )
        scene_rows += write_records(
            cfg, generator.split("eval"), staged.eval_json, staged.image_root, workers, show_progress
        )
        with staged.scenes.open("w") as handle:
            for row in scene_rows:
                handle.write(json.dumps(row) + "\n")
        world_config = {"config": asdict(cfg), "config_hash": digest, "code_version": WORLD_CODE_VERSION}
        (tmp / "world_config.json").write_text(json.dumps(world_config, indent=2, sort_keys=True))
        (tmp / COMPLETE_MARKER).write_text(digest + "\n")

        if final.exists() and not (final / COMPLETE_MARKER).is_file():
            shutil.rmtree(final)  # an incomplete world (e.g. from outside this function): rebuild it
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent build finished first; keep its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths


def load_scenes(paths: WorldPaths) -> dict[str, Scene]:
    """The scene graph of every image of a built world, keyed by the image path relative to ``image_root``."""
    scenes = {}
    with paths.scenes.open() as handle:
        for line_number, line in enumerate(handle, start=1):
            row = json.loads(line)
            try:
                scenes[row["image"]] = Scene.from_json(row["scene"])
            except (KeyError, ValueError) as error:
                raise ValueError(f"{paths.scenes}:{line_number}: bad scene row ({error})") from error
    return scenes
