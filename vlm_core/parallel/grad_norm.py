"""Global gradient-norm clipping when some parameters are split across tensor-parallel ranks."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from vlm_core.parallel.env import ParallelEnv


def clip_grad_norm_(
    params: Iterable[torch.Tensor], max_norm: float, env: ParallelEnv | None = None
) -> torch.Tensor | float:
    """Scale gradients so that their global L2 norm is at most ``max_norm``; return the norm before scaling.

    Without tensor parallelism (``env`` None or TP=1) this is ``torch.nn.utils.clip_grad_norm_`` itself
    (bit-identical to a run before parallelism existed), and the norm it returns is torch's 0-d tensor, left on
    the gradients' device: reading it would hold the host until the backward had run, before it launched the
    optimizer. With tensor parallelism the norm is a float. With it, a split parameter contributes the squares
    of its shard on each TP rank (summed over the group with one all-reduce), and a replicated one (norms,
    row-parallel biases) counts once: its gradient is the same on every rank of the group. DP ranks hold
    summed, identical gradients after the data-parallel reduce, so they agree on the norm without communicating.
    """
    params = [p for p in params if p.grad is not None]
    if env is None or not env.tensor_parallel:
        # foreach left to torch, as the optimizer's: per-tensor norms in one multi-tensor kernel on CUDA
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    device = env.collective_device
    split = torch.zeros((), dtype=torch.float64, device=device)
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    for param in params:
        square = param.grad.detach().double().pow(2).sum().to(device)
        if getattr(param, "tensor_model_parallel", False):
            split += square
        else:
            replicated += square
    dist.all_reduce(split, group=env.tp_group())
    total = math.sqrt(float(split + replicated))
    coefficient = min(1.0, max_norm / (total + 1e-6))  # torch's formula (clamped at 1)
    if coefficient < 1.0:
        for param in params:
            param.grad.detach().mul_(coefficient)
    return total
