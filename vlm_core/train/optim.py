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
    # foreach left to torch: its multi-tensor update on CUDA (a handful of kernel launches per step instead of
    # about seven per parameter, which a 24-layer decoder turns into ~1,500 launches), the per-parameter one on
    # the CPU, where CI's bit-for-bit resume and parallelism tests run. Both are deterministic.
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


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
