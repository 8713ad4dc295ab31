"""Batched greedy decoding with the model's KV cache."""

from __future__ import annotations

import torch

from vlm_core.model.vlm import VLM
from vlm_core.types import TokenizedSample


@torch.inference_mode()
def greedy_generate(
    model: VLM,
    prompts: list[TokenizedSample],
    max_new_tokens: int,
    eos_id: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """New token ids for each prompt, in input order, by greedy (argmax) decoding.

    A sequence stops at ``eos_id`` (not included in its output) or after ``max_new_tokens`` tokens.
    Prompts run ``batch_size`` at a time, grouped by length so that the padded KV cache wastes
    little; finished sequences leave the batch. ``model.image_token_id`` is never generated (its
    logit is masked): an image placeholder without an image would break the packed-batch contract
    when the output is fed back. The model runs in eval mode; its training flag is restored after.
    """
    if max_new_tokens < 0:
        raise ValueError(f"greedy_generate: max_new_tokens={max_new_tokens} must be >= 0")
    if batch_size < 1:
        raise ValueError(f"greedy_generate: batch_size={batch_size} must be >= 1")
    outputs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0 or not prompts:
        return outputs
    order = sorted(range(len(prompts)), key=lambda index: prompts[index].input_ids.numel())
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            generated = _generate_batch(model, [prompts[index] for index in chunk], max_new_tokens, eos_id)
            for index, tokens in zip(chunk, generated):
                outputs[index] = tokens
    finally:
        model.train(was_training)
    return outputs


def _generate_batch(model: VLM, prompts: list[TokenizedSample], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy decoding of one batch of prompts; see greedy_generate."""
    outputs: list[list[int]] = [[] for _ in prompts]
    logits, cache = model.prefill(prompts, max_new_tokens=max_new_tokens)  # [B, V]
    active = list(range(len(prompts)))  # prompt index of each row still in the cache
    for step in range(max_new_tokens):
        logits[:, model.image_token_id] = float("-inf")
        next_ids = logits.argmax(dim=-1)  # [B_active]
        keep = []
        for row, token in enumerate(next_ids.tolist()):
            if token == eos_id:
                continue
            outputs[active[row]].append(token)
            keep.append(row)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=next_ids.device)
            cache.select(rows)
            next_ids = next_ids.index_select(0, rows)
            active = [active[row] for row in keep]
        logits = model.decode_step(next_ids, cache)
    return outputs
