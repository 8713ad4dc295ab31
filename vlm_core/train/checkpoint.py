"""Checkpoints: safetensors weights and optimizer moments plus a JSON state, written atomically.

Layout of a run's ``checkpoints/`` folder::

    checkpoints/
      step-000200/          one checkpoint: model.safetensors, optimizer.safetensors, state.json
      step-000400/
      latest.json           {"name": "step-000400"}: the newest complete checkpoint

A checkpoint is written into a hidden temporary folder and renamed into place, then ``latest.json`` is
replaced; a run killed at any moment leaves either the old or the new checkpoint, never half of one.
Loading executes no code: safetensors for tensors, JSON for the rest.

Under tensor parallelism each TP rank writes its shard instead of ``model.safetensors`` (and of
``optimizer.safetensors``), and loading merges the shards of any TP size back into the single-device
layout (:mod:`vlm_core.parallel.checkpoint`); the caller passes a ``Sharding`` to say how its model is split.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from vlm_core.train.optim import keep_implementation

if TYPE_CHECKING:
    from vlm_core.parallel.checkpoint import Sharding

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
LATEST_FILE = "latest.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, or does not fit the model."""


@dataclass
class Checkpoint:
    """A loaded checkpoint's location and JSON state (tensors are loaded straight into their owners)."""

    path: Path
    state: dict[str, Any]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    root: Path,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep: int | None = None,
    sharding: Sharding | None = None,
) -> Path:
    """Write checkpoint ``root/name`` atomically and point ``latest.json`` at it.

    ``keep`` deletes the oldest ``step-*`` checkpoints beyond that many (named checkpoints such as
    ``tower`` or ``final`` are never deleted). In a distributed job every rank calls it with its
    ``sharding``: TP ranks write their shards, global rank 0 the rest (a whole model: all of it).
    """
    if sharding is not None and sharding.env.distributed:
        return _save_distributed(root, name, model, optimizer, state, keep, sharding)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_model(model, str(tmp / MODEL_FILE))  # handles the tied embedding / LM head weight
        full_state = dict(state)
        if optimizer is not None:
            tensors, meta = _flatten_optimizer(optimizer)
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            full_state["optimizer"] = meta
        full_state.setdefault("rng", _rng_state())
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1, sort_keys=True), encoding="utf-8")
        return _publish(tmp, root, name, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, root: Path, name: str, keep: int | None) -> Path:
    """fsync the files of ``tmp``, rename it to ``root/name``, point ``latest.json`` at it, prune old steps."""
    try:
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        final = root / name
        if final.exists():  # re-saving the same step after a resume: move the old one aside first
            stale = root / f".{name}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST_FILE, json.dumps({"name": name}))
    if keep is not None:
        steps = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _save_distributed(
    root: Path, name: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
    keep: int | None, sharding: Sharding,
) -> Path:
    """Every rank calls this; a whole model is written by global rank 0, a sharded one by each TP rank."""
    from vlm_core.parallel import checkpoint as shards
    from vlm_core.parallel.collectives import broadcast_object, gather_objects

    env = sharding.env
    full_state = {**state, "rng_ranks": gather_objects(_rng_state(), env)}  # each rank's RNG, for an exact resume
    final = root / name
    if not sharding.sharded:
        if env.is_main:
            save_checkpoint(root, name, model, optimizer, full_state, keep)
        env.barrier()
        return final
    tmp = None
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=f".{name}.")
    tmp = Path(broadcast_object(tmp, env))
    try:
        tensors, meta = _flatten_optimizer(optimizer) if optimizer is not None else (None, None)
        shards.write_shards(tmp, model, tensors, env)
        env.barrier()
        if env.is_main:
            if meta is not None:
                full_state["optimizer"] = meta
            full_state["rng"] = full_state["rng_ranks"][0]
            full_state["tensor_parallel"] = shards.tensor_parallel_state(sharding, optimizer, model)
            (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1, sort_keys=True), encoding="utf-8")
            _publish(tmp, root, name, keep)
    except BaseException:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    env.barrier()
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest.json`` points at, or None if the folder holds none."""
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text(encoding="utf-8"))["name"]
    path = root / name
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} points at {name}, but {path / STATE_FILE} does not exist")
    return path


def load_checkpoint(path: Path, model: nn.Module, restore_rng: bool = True) -> Checkpoint:
    """Load weights into ``model`` (strictly: every key must match) and restore the RNG state.

    ``model`` is single-device; a checkpoint written under tensor parallelism is merged first.
    """
    from vlm_core.parallel.checkpoint import is_sharded, read_model_tensors

    path = Path(path)
    sharded = is_sharded(path)
    for file in (STATE_FILE,) if sharded else (MODEL_FILE, STATE_FILE):
        if not (path / file).is_file():
            raise CheckpointError(f"checkpoint {path} has no {file}; is it a checkpoint folder?")
    if sharded:
        missing, unexpected = model.load_state_dict(read_model_tensors(path), strict=False)
    else:
        missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path / MODEL_FILE} does not fit the model: missing keys {sorted(missing)[:8]}, "
            f"unexpected keys {sorted(unexpected)[:8]}; was it saved with a different model config?"
        )
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    if restore_rng and "rng" in state:
        _restore_rng(_own_rng(state))
    return Checkpoint(path=path, state=state)


def _own_rng(state: dict[str, Any]) -> dict[str, Any]:
    """This rank's saved RNG state when the checkpoint has one per rank for a world of this size, else rank 0's."""
    import torch.distributed as dist

    ranks = state.get("rng_ranks")
    if ranks and dist.is_initialized() and dist.get_world_size() == len(ranks):
        return ranks[dist.get_rank()]
    return state["rng"]


def load_optimizer_state(
    path: Path, optimizer: torch.optim.Optimizer, model: nn.Module | None = None, sharding: Sharding | None = None,
) -> None:
    """Restore the optimizer of the stage the checkpoint was taken in (moments from safetensors).

    Tensor-parallel shards (in the checkpoint, or in ``optimizer`` as ``sharding`` says) are merged and
    re-cut for this rank; ``model`` names the optimizer's parameters for that.
    """
    from vlm_core.parallel import checkpoint as shards

    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    sharded = shards.is_sharded(path)
    if "optimizer" not in state or not (sharded or (path / OPTIMIZER_FILE).is_file()):
        raise CheckpointError(f"checkpoint {path} holds no optimizer state to resume from")
    if sharded or (sharding is not None and sharding.sharded):
        if model is None or sharding is None:
            raise CheckpointError(f"checkpoint {path} is tensor-parallel: pass the model and its sharding to reshard it")
        full = shards.read_optimizer_tensors(path, state)
        tensors = shards.shard_optimizer_tensors(full, optimizer, model, sharding)
    else:
        tensors = load_file(str(path / OPTIMIZER_FILE))
    optimizer.load_state_dict(keep_implementation(optimizer, _unflatten_optimizer(tensors, state["optimizer"])))


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into safetensors-ready tensors and JSON-ready everything else."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state_dict["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{slot}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[slot] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    for index, slots in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, Any]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}
    if torch.cuda.is_available():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()
        ]
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])
