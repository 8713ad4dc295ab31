"""Data parallelism on the gradient side: torch DDP over megatron-core's data-parallel group.

The training loop computes each micro-batch's *summed* loss (``StepOutput.loss_sum``) and divides the
accumulated gradient once by the step's unit count. DDP's default hook averages over ranks instead; here
a hook sums, and the loop divides by the unit count summed over the DP ranks, so a DP step's gradient is
exactly the gradient of the union batch, whatever the split.

DDP needs the forward to go through it, so the loss function is wrapped into a module whose forward is
``loss_fn(model, micro)``; the model inside keeps its own methods (``hidden_states``, ``decoder.logits``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlm_core.parallel.env import ParallelEnv


class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, micro: Any) -> Any:
        return self.loss_fn(self.model, micro)


def _sum_hook(group, bucket):  # no annotations: DDP checks them and this module's are strings (__future__)
    """All-reduce a gradient bucket (``dist.GradBucket``) as a sum (DDP's default divides by the group size)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


class DataParallelStep:
    """``step(micro, sync)`` runs ``loss_fn(model, micro)`` under DDP; gradients are summed over the DP ranks
    in the backward of the micro-batch called with ``sync=True`` (the last one of an optimizer step)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any], env: ParallelEnv) -> None:
        group = env.dp_group()
        # device_ids=None: the batches are already on the model's device; broadcast_buffers=False: the model's
        # only buffers are constants. DDP syncs the parameters from DP rank 0 when it is built.
        self.ddp = DistributedDataParallel(
            _LossModule(model, loss_fn), device_ids=None, process_group=group, broadcast_buffers=False,
        )
        self.ddp.register_comm_hook(group, _sum_hook)

    def __call__(self, micro: Any, sync: bool) -> Any:
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            return self.ddp(micro)
