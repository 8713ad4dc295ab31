"""The optimizer-step loop shared by every training stage.

A stage supplies a :class:`BatchSource` (the micro-batches of each optimizer step, with a resumable
position) and a loss function; the loop does gradient accumulation, clipping, the learning-rate schedule,
logging, progress and checkpoints. Resuming restores model, optimizer and source, then calls
:func:`run_stage` with ``start_step``: the remaining steps are the ones an uninterrupted run would take.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from vlm_core.parallel.collectives import all_reduce_sums
from vlm_core.parallel.grad_norm import clip_grad_norm_
from vlm_core.train.checkpoint import save_checkpoint
from vlm_core.train.metrics import MetricsLogger
from vlm_core.train.optim import lr_at, set_lr

if TYPE_CHECKING:
    from vlm_core.parallel.checkpoint import Sharding
    from vlm_core.parallel.env import ParallelEnv
    from vlm_core.parallel.preemption import PreemptionGuard


class BatchSource(Protocol):
    """Yields the micro-batches of one optimizer step; its position survives a checkpoint."""

    def next_step(self) -> list[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class StepOutput:
    """What a loss function returns for one micro-batch.

    ``loss_sum`` is summed (not averaged) over the micro-batch's ``units`` (label tokens, or patches), so
    the loop can normalise over the whole optimizer step: accumulation then gives the same gradient as
    one big batch, whatever the split. ``stats`` are additive counters (tokens, slots, correct, ...).
    """

    loss_sum: torch.Tensor
    units: int
    stats: dict[str, float] = field(default_factory=dict)


LossFn = Callable[[nn.Module, Any], StepOutput]
Summarize = Callable[[dict[str, float]], dict[str, float]]


@dataclass
class StageSpec:
    """One training stage's schedule and its place on the run's global step axis."""

    name: str
    steps: int
    step_offset: int  # global step just before this stage's first step
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float


@dataclass
class LoopContext:
    """Run-wide settings the loop needs besides the stage."""

    run_dir: Path
    logger: MetricsLogger
    device: torch.device
    bf16: bool  # autocast matmuls to bf16 (see use_bf16)
    log_every: int
    ckpt_every: int  # 0 = this stage writes no step checkpoints (its caller saves the result)
    keep_checkpoints: int
    checkpoint_state: Callable[[], dict[str, Any]]  # extra JSON state for every checkpoint (completed stages...)
    sample_every: int = 0
    on_sample: Callable[[int], None] | None = None
    show_progress: bool = True
    # A stage whose batches are split over data-parallel ranks (and whose model may be tensor-parallel) sets
    # ``parallel``: gradients and counters are summed over the DP ranks, the grad norm taken over the TP ranks.
    parallel: ParallelEnv | None = None
    sharding: Sharding | None = None  # how checkpoints are written in a distributed job (every rank saves)
    preemption: PreemptionGuard | None = None  # a Slurm job's: checkpoint and requeue at a step boundary


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve ``train.precision``: "auto" is bf16 on CUDA, and on CPUs whose oneDNN has native bf16.

    On an AVX512-BF16 CPU (AMD Zen 4 here) a tiny-model training step took 0.09 s in bf16 against
    0.17 s in fp32; on CPUs without it bf16 is emulated and slower, so "auto" keeps fp32 there.
    """
    if precision == "auto":
        if device.type == "cuda":
            return True
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return precision == "bf16"


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for matmuls (weights, gradients and optimizer state stay fp32), or nothing."""
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_stage(
    spec: StageSpec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    source: BatchSource,
    loss_fn: LossFn,
    summarize: Summarize,
    context: LoopContext,
    start_step: int = 0,
) -> dict[str, float]:
    """Run optimizer steps ``start_step + 1 .. spec.steps`` of a stage; return the last logged metrics."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    env = context.parallel
    data_parallel = env is not None and env.dp_size > 1
    if data_parallel:
        from vlm_core.parallel.ddp import DataParallelStep

        step_fn = DataParallelStep(model, loss_fn, env)
    last: dict[str, float] = {}
    window: dict[str, float] = {}
    window_start = time.perf_counter()
    progress = tqdm(
        total=spec.steps, initial=start_step, desc=f"{spec.name:>8}", disable=not context.show_progress,
        dynamic_ncols=True, leave=True,
    )
    model.train()
    if context.preemption is not None:
        context.preemption.in_loop = True
    for stage_step in range(start_step + 1, spec.steps + 1):
        lr = lr_at(stage_step - 1, spec.lr, spec.warmup_steps, spec.steps, spec.min_lr_ratio)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        total_units = 0
        # device values stay tensors until a log line needs them: a float() here would hold the host until the
        # backward had run, with the optimizer's launches still to come
        stats: dict[str, float | torch.Tensor] = {"loss_sum": 0.0}
        micros = source.next_step()
        for index, micro in enumerate(micros):
            with autocast(context.device, context.bf16):
                if data_parallel:  # the last micro-batch's backward sums the gradients over the DP ranks
                    out = step_fn(micro, sync=index == len(micros) - 1)
                else:
                    out = loss_fn(model, micro)
            out.loss_sum.backward()
            total_units += out.units
            stats["loss_sum"] = stats["loss_sum"] + out.loss_sum.detach().double()  # as exact as a float sum
            for key, value in out.stats.items():
                value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
                stats[key] = stats.get(key, 0.0) + value
        if data_parallel:  # the step's loss, units and counters over the union batch of the DP ranks
            stats = all_reduce_sums({**stats, "units": total_units}, env, env.dp_group())
            total_units = round(stats.pop("units"))
        if total_units == 0:
            raise RuntimeError(f"stage {spec.name} step {stage_step}: the batch has no supervised tokens")
        # loss_sum / total_units, applied once to the accumulated gradient; one multi-tensor kernel on CUDA
        grads = [param.grad for param in params if param.grad is not None]
        if grads:  # (none: a micro-batch that reached no trained parameter)
            torch._foreach_div_(grads, total_units)
        max_norm = spec.grad_clip if spec.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm_(params, max_norm, env)  # over the TP shards when the model is split
        optimizer.step()

        stats["units"] = total_units
        stats["grad_norm_sum"] = grad_norm.double() if isinstance(grad_norm, torch.Tensor) else grad_norm
        stats["steps"] = 1
        for key, value in stats.items():
            window[key] = window.get(key, 0.0) + value
        step = spec.step_offset + stage_step
        progress.update(1)
        if stage_step % context.log_every == 0 or stage_step == spec.steps:
            window = {key: float(value) for key, value in window.items()}  # the window's one host read
            elapsed = max(1e-9, time.perf_counter() - window_start)
            last = {
                "loss": window["loss_sum"] / window["units"],
                "lr": lr,
                "grad_norm": window["grad_norm_sum"] / window["steps"],
                "steps_per_s": window["steps"] / elapsed,
                "stage_step": stage_step,
            }
            last.update(summarize({**window, "elapsed_s": elapsed}))
            context.logger.log(step, spec.name, last)
            progress.set_postfix({k: f"{v:.3g}" for k, v in last.items() if k in ("loss", "acc", "tokens_per_s")})
            window, window_start = {}, time.perf_counter()
        if context.on_sample is not None and context.sample_every and stage_step % context.sample_every == 0:
            context.on_sample(step)
        saved = bool(context.ckpt_every) and (stage_step % context.ckpt_every == 0 or stage_step == spec.steps)
        stop = context.preemption is not None and context.preemption.requested()
        if saved or (stop and context.ckpt_every):
            state = {"stage": spec.name, "stage_step": stage_step, "step": step, "data": source.state_dict()}
            state.update(context.checkpoint_state())
            save_checkpoint(
                context.run_dir / "checkpoints", f"step-{step:06d}", model, optimizer, state,
                keep=context.keep_checkpoints, sharding=context.sharding,
            )
        if stop:
            progress.close()
            context.preemption.stop(step)
    progress.close()
    if context.preemption is not None:
        context.preemption.in_loop = False
    return last
