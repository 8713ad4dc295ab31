"""Tensor-parallel checkpoints: each TP rank writes its shard; any TP size reads them back (resharding on load).

A checkpoint written under TP=n holds, next to ``state.json``::

    model-tp00-of-0n.safetensors ... model-tp(n-1)-of-0n.safetensors        each TP rank's parameter shards
    optimizer-tp00-of-0n.safetensors ...                                    its AdamW moments (same split)

and ``state.json["tensor_parallel"]`` records the split: ``{"size": n, "vocab_size": V, "layout":
{param: [dim, stride, vocab]}, "optimizer_params": [param name of optimizer index i]}``. Only DP rank 0
of each TP group writes (the DP replicas hold the same tensors).

Reading always goes through the single-device layout: :func:`read_model_tensors` merges the shards (any n,
or a single-device ``model.safetensors``), and the job cuts the merged weights for its own TP size
(``vlm_core.parallel.plan.parallelize``). The optimizer's moments take the same path
(:func:`read_optimizer_tensors`, :func:`shard_optimizer_tensors`). So TP=a -> TP=b for any a, b that
divide the model, and a resumed run continues exactly from the merged state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlm_core.parallel.env import ParallelEnv
from vlm_core.parallel.reshard import (
    Layout,
    ShardSpec,
    merge_states,
    merge_tensors,
    shard_tensor,
)
from vlm_core.train.checkpoint import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE

MODEL_SHARD = "model-tp{rank:02d}-of-{size:02d}.safetensors"
OPTIMIZER_SHARD = "optimizer-tp{rank:02d}-of-{size:02d}.safetensors"


class ShardError(ValueError):
    """A sharded checkpoint is incomplete or inconsistent."""


@dataclass
class Sharding:
    """How the job's model is spread when a checkpoint is written or read.

    ``layout`` is None while the model is whole on every rank (stages before tensor parallelism starts,
    and every stage of a TP=1 job): then global rank 0 writes the ordinary single-device files.
    """

    env: ParallelEnv
    layout: Layout | None = None
    vocab_size: int = 0  # unpadded vocabulary (the embedding rows the shards drop their padding to)

    @property
    def sharded(self) -> bool:
        return self.layout is not None and self.env.tensor_parallel


def optimizer_param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The parameter name of each optimizer index (the order of ``optimizer.state_dict()``)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def write_shards(
    folder: Path, model: nn.Module, optimizer_tensors: dict[str, torch.Tensor] | None, env: ParallelEnv
) -> None:
    """Write this TP rank's model (and optimizer) shard into ``folder`` (DP rank 0 of each TP group only)."""
    if env.dp_rank != 0:
        return
    rank, size = env.tp_rank, env.tp_size
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(folder / MODEL_SHARD.format(rank=rank, size=size)))
    if optimizer_tensors is not None:
        save_file(optimizer_tensors, str(folder / OPTIMIZER_SHARD.format(rank=rank, size=size)))


def tensor_parallel_state(sharding: Sharding, optimizer: torch.optim.Optimizer | None, model: nn.Module) -> dict:
    """The ``state.json["tensor_parallel"]`` record of a sharded checkpoint."""
    return {
        "size": sharding.env.tp_size,
        "vocab_size": sharding.vocab_size,
        "layout": {name: spec.to_json() for name, spec in sorted(sharding.layout.items())},
        "optimizer_params": optimizer_param_names(optimizer, model) if optimizer is not None else [],
    }


def _record(state: dict[str, Any], path: Path) -> tuple[int, int, Layout]:
    record = state.get("tensor_parallel")
    if not isinstance(record, dict) or not {"size", "vocab_size", "layout"} <= set(record):
        raise ShardError(f"checkpoint {path} holds model shards but state.json has no tensor_parallel record")
    layout = {name: ShardSpec.from_json(spec) for name, spec in record["layout"].items()}
    return int(record["size"]), int(record["vocab_size"]), layout


def _shard_files(path: Path, pattern: str, size: int) -> list[Path]:
    files = [path / pattern.format(rank=rank, size=size) for rank in range(size)]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise ShardError(f"checkpoint {path} written under tensor_parallel={size} lacks {missing}")
    return files


def is_sharded(path: Path) -> bool:
    return any(Path(path).glob("model-tp*-of-*.safetensors"))


def _state(path: Path) -> dict[str, Any]:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise ShardError(f"checkpoint {path} holds model shards but no state.json (it records how they split)")
    return json.loads(file.read_text(encoding="utf-8"))


def read_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors in the single-device layout, whatever TP size wrote them."""
    path = Path(path)
    if not is_sharded(path):
        return load_file(str(path / MODEL_FILE))
    size, vocab_size, layout = _record(_state(path), path)
    shards = [load_file(str(file)) for file in _shard_files(path, MODEL_SHARD, size)]
    return merge_states(shards, layout, vocab_size)


def read_optimizer_tensors(path: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The optimizer's tensors (``"{index}.{slot}"``) in the single-device layout."""
    path = Path(path)
    if not is_sharded(path):
        return load_file(str(path / OPTIMIZER_FILE))
    size, vocab_size, layout = _record(state, path)
    names = state["tensor_parallel"].get("optimizer_params", [])
    shards = [load_file(str(file)) for file in _shard_files(path, OPTIMIZER_SHARD, size)]
    merged = {}
    for key in shards[0]:
        index, _ = key.split(".", 1)
        spec = layout.get(names[int(index)]) if int(index) < len(names) else None
        parts = [shard[key] for shard in shards]
        merged[key] = parts[0] if spec is None or parts[0].dim() == 0 else merge_tensors(parts, spec, vocab_size)
    return merged


def shard_optimizer_tensors(
    full: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, model: nn.Module, sharding: Sharding
) -> dict[str, torch.Tensor]:
    """Cut single-device optimizer tensors for this rank's (possibly sharded) optimizer."""
    if not sharding.sharded:
        return full
    names = optimizer_param_names(optimizer, model)
    out = {}
    for key, tensor in full.items():
        index, _ = key.split(".", 1)
        spec = sharding.layout.get(names[int(index)])
        if spec is None or tensor.dim() == 0:
            out[key] = tensor
        else:
            out[key] = shard_tensor(tensor, spec, sharding.env.tp_rank, sharding.env.tp_size, key)
    return out
