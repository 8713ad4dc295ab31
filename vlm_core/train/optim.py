"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    trainable: list[str],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
) -> torch.optim.AdamW:
    """Freeze every top-level module not in ``trainable`` and return AdamW over the rest.

    Weight decay applies to parameters with two or more dimensions (linear and conv weights); norms,
    biases and position tables are not decayed (the GPT-2/LLaMA convention). Embeddings are 2-D but
    tied to the LM head here, so they decay with it.
    """
    names = {name for name, _ in model.named_children()}
    unknown = sorted(set(trainable) - names)
    if unknown:
        raise ValueError(f"trainable modules {unknown} are not parts of the model; it has {sorted(names)}")
    decay, no_decay = [], []
    for child_name, child in model.named_children():
        train_it = child_name in trainable
        for param in child.parameters():
            param.requires_grad_(train_it)
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError(f"no trainable parameters in modules {trainable}")
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **implementation(decay + no_decay))


# The param-group entries that pick how AdamW runs, not what it computes.
IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def implementation(params: list[torch.Tensor]) -> dict[str, bool]:
    """AdamW's implementation for parameters on these devices: ``fused`` where all are on CUDA, else torch's
    default.

    On CUDA the fused update reads each parameter, gradient and moment once and writes them once, in one
    kernel per dtype; torch's default there, foreach, runs a multi-tensor kernel per arithmetic step (about
    ten passes over 272 M float32 values a step for ``small``). Elsewhere torch's default stays: the
    per-parameter update on the CPU, where the README's figures and CI's bit-for-bit resume and parallelism
    tests run. Both are deterministic.
    """
    return {"fused": True} if params and all(p.device.type == "cuda" for p in params) else {}


def keep_implementation(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """``state_dict`` with its param groups' implementation flags replaced by ``optimizer``'s own.

    torch's ``load_state_dict`` takes every group entry from the saved dict, so a run resumed on a GPU from
    a checkpoint written on the CPU would step with the CPU's implementation, and the reverse with the
    GPU's. The flags belong to the device the run is on; the hyperparameters and moments to the checkpoint.
    (torch also moves each ``step`` to its parameter's device when the group it reads is fused.)
    """
    groups = state_dict["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"the optimizer state has {len(groups)} param groups; this optimizer has "
                         f"{len(optimizer.param_groups)}")  # fmt: skip
    merged = []
    for saved, own in zip(groups, optimizer.param_groups):
        group = dict(saved)
        for flag in IMPLEMENTATION_FLAGS:
            if flag in own:
                group[flag] = own[flag]
            else:
                group.pop(flag, None)
        merged.append(group)
    return {**state_dict, "param_groups": merged}


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to peak * min_ratio."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
