"""The LM head's cross-entropy, single-device or vocab-parallel, so that logits are never gathered.

Under tensor parallelism each rank holds rows ``[start, end)`` of the (padded) vocabulary, so the LM head
gives it the logits of its own vocabulary slice, ``[n, V_pad / tp]``. megatron-core's
``vocab_parallel_cross_entropy`` takes the softmax across the slices with two all-reduces of ``[n]``
values (max and sum of exponentials) instead of gathering ``[n, V]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_vocab_parallel(decoder: nn.Module) -> bool:
    """True when the plan replaced the decoder's embedding with a vocab-parallel one (TP > 1)."""
    embedding = getattr(decoder, "embed_tokens", None)  # stand-ins for a decoder (tests) may have none
    return hasattr(embedding, "vocab_start_index") and hasattr(embedding, "vocab_size")


def vocab_parallel_logits(decoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [n, D], the same on every TP rank -> this rank's logits [n, V_pad / tp], padding rows at -inf.

    The LM head of a TP rank sees only its vocabulary rows, so the gradient it sends back to ``hidden`` is
    that slice's share; ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward)
    sums the shares, for the tied head (which reads the embedding rows) and the untied one alike.
    """
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
    )

    embedding = decoder.embed_tokens
    logits = decoder.logits(copy_to_tensor_model_parallel_region(hidden))  # [n, V_pad / tp]
    start, end = embedding.vocab_start_index, embedding.vocab_end_index
    if end > embedding.vocab_size:  # this slice holds padding rows: no token has them, the softmax must not either
        padding = torch.arange(start, end, device=logits.device) >= embedding.vocab_size  # [V_pad / tp]
        logits = logits.masked_fill(padding, float("-inf"))
    return logits


def token_cross_entropy(decoder: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token loss [n] (fp32) of final hidden states [n, D] against labels [n] int64.

    Single-device: ``F.cross_entropy`` over the full logits (unchanged from before tensor parallelism, so
    TP=1 runs are bit-identical). Vocab-parallel: megatron-core's ``vocab_parallel_cross_entropy``.
    """
    if not is_vocab_parallel(decoder):
        return F.cross_entropy(decoder.logits(hidden).float(), labels, reduction="none")
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(vocab_parallel_logits(decoder, hidden).float(), labels)
