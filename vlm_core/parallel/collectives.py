"""The few collectives the training job needs besides the model's own: sums, a flag, a broadcast, a gather."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlm_core.parallel.env import ParallelEnv


def all_reduce_sums(values: dict[str, float], env: ParallelEnv, group: Any) -> dict[str, float]:
    """Sum each value over the ranks of ``group`` (one all-reduce of a float64 vector; keys sorted)."""
    if group is None or dist.get_world_size(group) == 1:
        return dict(values)
    keys = sorted(values)
    vector = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=env.collective_device)
    dist.all_reduce(vector, group=group)
    return dict(zip(keys, vector.tolist()))


def any_rank(flag: bool, env: ParallelEnv) -> bool:
    """True on every rank if ``flag`` is true on any rank (so that all ranks take the same branch)."""
    if not env.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=env.collective_device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_module(module: nn.Module, env: ParallelEnv) -> None:
    """Copy global rank 0's parameters and buffers into every rank's ``module`` (same structure everywhere)."""
    if not env.distributed:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if env.collective_device == tensor.device:
                dist.broadcast(tensor.data, src=0)
            else:
                staged = tensor.data.to(env.collective_device)
                dist.broadcast(staged, src=0)
                tensor.data.copy_(staged)


def broadcast_object(value: Any, env: ParallelEnv) -> Any:
    """Global rank 0's ``value`` on every rank (a picklable object)."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=env.collective_device)
    return box[0]


def gather_objects(value: Any, env: ParallelEnv, group: Any = None) -> list[Any]:
    """Every rank's ``value`` (of ``group``, default the world), in rank order, on every rank."""
    if not env.distributed:
        return [value]
    size = dist.get_world_size(group)
    out: list[Any] = [None] * size
    dist.all_gather_object(out, value, group=group)
    return out
