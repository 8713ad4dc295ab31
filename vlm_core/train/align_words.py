"""Stage 1 without a pretrained LLM: align every image token with the words that name its cell.

LLaVA's stage 1 trains the projector so that image tokens land where a *pretrained* LLM can read them.
The tiny decoder here starts from random weights, so there is nothing to land on (aligning to it on
captions left the caption loss at ln(V)). What the decoder later has to learn instead is a lookup:
"what color is the circle?" means finding the image token that looks like "circle" and reading out the
word for its colour. This stage makes that lookup cheap to discover: the projector learns to write each
cell as the (tied) embeddings of its words, so an image token of a small red circle scores high on
"small", "red" and "circle" through the LM head. The targets come from the world's scene graph, one
patch at a time, like the tower's; only the projector trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from curation.sources.world.config import WorldConfig
from vlm_core.train.loop import StepOutput

# Heads of curation.sources.world.labels whose classes are words: class 0 is "nothing here".
WORD_HEADS: tuple[str, ...] = ("color", "shape", "size", "word")


def word_token_table(world: WorldConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Per head, ``[classes, 2]`` token ids of each class's word, bare and after a space (-1 = none).

    Both forms because the two places a word appears tokenize differently with byte-level BPE: an answer
    starts a line ("red"), a question has it mid-sentence (" red"). A word that splits into several
    tokens is represented by its first.
    """
    vocab = {"color": world.colors, "shape": world.shapes, "size": world.sizes, "word": world.words}

    def first_token(text: str) -> int:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"the tokenizer maps {text!r} to no tokens")
        return ids[0]

    tables = {}
    for head in WORD_HEADS:
        rows = [[-1, -1]]  # class 0: empty cell
        rows += [[first_token(word), first_token(" " + word)] for word in vocab[head]]
        if head == "shape":
            rows.append([-1, -1])  # the last shape class marks a word cell, which has no shape word
        tables[head] = torch.tensor(rows, dtype=torch.long)
    return tables


def cell_word_loss(
    model: nn.Module, batch: tuple[torch.Tensor, dict[str, torch.Tensor]], table: dict[str, torch.Tensor],
) -> StepOutput:
    """Mean negative log-likelihood, under the LM head, of each image token's cell words.

    ``batch``: images ``[N, C, H, W]`` and per-patch labels ``{head: [N, P]}``. Every target word of a
    token shares one softmax over the vocabulary, so the token is pushed towards the sum of its words.
    """
    images, labels = batch
    tokens = model.encode_images(images)  # [N, P, D]
    log_probs = F.log_softmax(model.decoder.logits(tokens).float(), dim=-1)  # [N, P, V]
    targets = torch.cat([table[head].to(images.device)[labels[head]] for head in WORD_HEADS], dim=-1)  # [N, P, K]
    valid = targets >= 0  # [N, P, K]
    picked = log_probs.gather(-1, targets.clamp(min=0))  # [N, P, K]
    loss_sum = -(picked * valid).sum()
    units = int(valid.sum())
    # How often the top-scoring token of a cell is one of its words: the alignment a reader can check.
    top = log_probs.argmax(-1, keepdim=True)  # [N, P, 1]
    has_word = valid.any(-1)  # [N, P]
    hit = ((targets == top) & valid).any(-1) & has_word
    stats = {"top1_hits": float(hit.sum()), "cells": float(has_word.sum()), "images": images.shape[0]}
    return StepOutput(loss_sum, max(1, units), stats)


def summarize_cell_words(window: dict[str, float]) -> dict[str, float]:
    return {
        "top1_word_acc": window["top1_hits"] / max(1.0, window["cells"]),
        "images_per_s": window["images"] / window["elapsed_s"],
    }
