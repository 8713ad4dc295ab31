"""Key/value cache for incremental decoding, and the attention of one decode step over it."""

from __future__ import annotations

import math
from typing import Optional

import torch


class KVCache:
    """Post-RoPE keys and values of B sequences, padded to a shared capacity S_max.

    ``keys[layer]`` and ``values[layer]``: [B, Hkv, S_max, Dh]. Sequence b owns entries
    0 .. lengths[b] - 1 (its positions); entries past that are stale padding and are masked out.
    ``lengths`` is [B] int64 on the cache's device; ``max_length`` mirrors max(lengths) on the host so
    that growing the buffers never reads the device.

    Life cycle: the model's ``prefill`` creates the cache with the prompt lengths and fills it with
    ``write_packed`` (one call per layer); each ``decode_step`` calls ``append`` per layer, then
    ``advance`` once. ``select`` drops finished sequences.
    """

    def __init__(
        self,
        layers: int,
        lengths: list[int],
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"KVCache: every sequence needs at least one token, got lengths {lengths}")
        if capacity < max(lengths):
            raise ValueError(f"KVCache: capacity={capacity} is below the longest sequence ({max(lengths)})")
        B = len(lengths)
        self.keys = [torch.zeros(B, kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(B, kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.lengths = torch.tensor(lengths, dtype=torch.int64, device=device)  # [B]
        self.max_length = max(lengths)
        # Packed layout of the prefill: token t of the flat batch is (sample, position).
        self._packed_sample = torch.repeat_interleave(torch.arange(B, device=device), self.lengths)  # [total]
        self._packed_position = torch.cat([torch.arange(n, device=device) for n in lengths])  # [total]

    @property
    def batch_size(self) -> int:
        return self.lengths.numel()

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def write_packed(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's prefill keys/values. k, v: [total, Hkv, Dh], samples back to back in the
        order and with the lengths given at construction."""
        if k.shape[0] != self._packed_sample.numel():
            raise ValueError(f"KVCache.write_packed: got {k.shape[0]} tokens, the prompts have {self._packed_sample.numel()}")
        self.keys[layer][self._packed_sample, :, self._packed_position] = k.to(self.keys[layer].dtype)
        self.values[layer][self._packed_sample, :, self._packed_position] = v.to(self.values[layer].dtype)

    def ensure_capacity(self, needed: int) -> None:
        """Grow every layer's buffers (doubling) so that ``needed`` entries per sequence fit."""
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                grown = old.new_zeros(old.shape[0], old.shape[1], new_capacity, old.shape[3])  # [B, Hkv, S_max', Dh]
                grown[:, :, : old.shape[2]] = old
                buffers[layer] = grown

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one new token per sequence at its current length. k, v: [B, Hkv, Dh].

        Call ``ensure_capacity(max_length + 1)`` once per step before the first layer appends.
        """
        rows = torch.arange(self.batch_size, device=self.lengths.device)
        self.keys[layer][rows, :, self.lengths] = k.to(self.keys[layer].dtype)
        self.values[layer][rows, :, self.lengths] = v.to(self.values[layer].dtype)

    def advance(self) -> None:
        """Mark the token appended by every layer in this step as part of each sequence."""
        self.lengths += 1
        self.max_length += 1

    def select(self, keep: torch.Tensor) -> None:
        """Keep only sequences ``keep`` ([B'] int64 indices, in the new order); frees the rest."""
        self.keys = [k.index_select(0, keep) for k in self.keys]
        self.values = [v.index_select(0, keep) for v in self.values]
        self.lengths = self.lengths.index_select(0, keep)
        self.max_length = int(self.lengths.max()) if keep.numel() else 0


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid_lengths: torch.Tensor,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over that sequence's cached keys and values.

    q: [B, Hq, Dh]; keys, values: [B, Hkv, S_max, Dh] with Hq % Hkv == 0 (query head h reads KV head
    h // (Hq / Hkv), as in packed_attention); valid_lengths: [B], entries 0 .. valid_lengths[b] - 1
    are attended (the new token's own entry included). Returns [B, Hq, Dh] in q's dtype; softmax in fp32.

    Why this equals ``packed_attention`` on the full sequence: the new token is text (bidir_group 0),
    so the packed contract lets it attend to exactly the tokens j <= i of its own sample, which are
    the cache entries 0 .. length. The cached keys/values of earlier tokens are the ones the full
    forward computes, because no earlier token may attend to a later one except inside an image
    span, and image spans lie wholly in the prompt that prefill processed with the full mask.
    """
    B, num_q_heads, head_dim = q.shape
    num_kv_heads, capacity = keys.shape[1], keys.shape[2]
    group = num_q_heads // num_kv_heads
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    q_grouped = q.float().view(B, num_kv_heads, group, head_dim)  # [B, Hkv, G, Dh]
    scores = torch.einsum("bhgd,bhsd->bhgs", q_grouped, keys.float()) * scale  # [B, Hkv, G, S_max]
    valid = torch.arange(capacity, device=q.device)[None, :] < valid_lengths[:, None]  # [B, S_max]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [B, Hkv, G, S_max]
    out = torch.einsum("bhgs,bhsd->bhgd", probs, values.float())  # [B, Hkv, G, Dh]
    return out.reshape(B, num_q_heads, head_dim).to(q.dtype)  # [B, Hq, Dh]
