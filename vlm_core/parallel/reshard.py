"""Cut single-device tensors into tensor-parallel shards and glue shards back together: the resharding maths.

Pure tensor code (no process groups, no megatron-core), so a checkpoint written under TP=a can be read on
one CPU, merged into the single-device layout, and cut again for TP=b. A :class:`ShardSpec` says how one
parameter is split; a *layout* maps parameter names to specs (a name it does not list is replicated:
every rank holds the whole tensor).

    column-parallel weight  [out, in]  split on dim 0        (its bias [out] too)
    row-parallel weight     [out, in]  split on dim 1        (its bias is replicated)
    fused q|k|v weight      [3 D, D]   dim 0 with stride 3   (each rank takes its heads of q, of k and of v)
    vocab-parallel table    [V, D]     dim 0, padded with zero rows to a multiple of the TP size

Shard r of a spec with stride s: view the dim as s equal blocks, cut each block into ``size`` pieces, and
keep piece r of every block, in block order. This is what megatron-core's ``_initialize_affine_weight_cpu``
does with ``stride``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Layout = dict[str, "ShardSpec"]


@dataclass(frozen=True)
class ShardSpec:
    """How one tensor is split across the ranks of a tensor-parallel group."""

    dim: int  # the split dimension
    stride: int = 1  # equal blocks along ``dim`` that are split separately (3 for a fused q|k|v)
    vocab: bool = False  # rows are vocabulary entries: pad dim 0 with zero rows to a multiple of the TP size

    def to_json(self) -> list:
        return [self.dim, self.stride, self.vocab]

    @classmethod
    def from_json(cls, value: list) -> ShardSpec:
        dim, stride, vocab = value
        return cls(int(dim), int(stride), bool(vocab))


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """The vocabulary rounded up to a multiple of ``tp_size`` (megatron-core splits it evenly)."""
    return -(-vocab_size // tp_size) * tp_size


def shard_tensor(full: torch.Tensor, spec: ShardSpec, rank: int, size: int, name: str = "tensor") -> torch.Tensor:
    """Rank ``rank``'s shard of the single-device tensor ``full`` (a new contiguous tensor)."""
    if not 0 <= rank < size:
        raise ValueError(f"{name}: rank {rank} is outside a tensor-parallel group of {size}")
    if spec.vocab:
        rows = padded_vocab_size(full.shape[0], size)
        if rows != full.shape[0]:
            padding = full.new_zeros((rows - full.shape[0], *full.shape[1:]))
            full = torch.cat([full, padding])  # [V_pad, ...]: zero rows that no token id reaches
    length = full.shape[spec.dim]
    if length % (spec.stride * size):
        raise ValueError(
            f"{name}: dim {spec.dim} of shape {tuple(full.shape)} is not divisible by stride {spec.stride} x "
            f"tensor_parallel {size}; choose a tensor_parallel that divides the heads and widths"
        )
    blocks = full.chunk(spec.stride, dim=spec.dim)
    return torch.cat([block.chunk(size, dim=spec.dim)[rank] for block in blocks], dim=spec.dim).contiguous()


def merge_tensors(shards: list[torch.Tensor], spec: ShardSpec, vocab_size: int | None = None) -> torch.Tensor:
    """The single-device tensor from every rank's shard (in rank order); inverse of :func:`shard_tensor`.

    ``vocab_size`` (needed when ``spec.vocab``) drops the padding rows again.
    """
    size = len(shards)
    pieces = [shard.chunk(spec.stride, dim=spec.dim) for shard in shards]  # [rank][block]
    blocks = [torch.cat([pieces[rank][block] for rank in range(size)], dim=spec.dim) for block in range(spec.stride)]
    full = torch.cat(blocks, dim=spec.dim)
    if spec.vocab:
        if vocab_size is None:
            raise ValueError("merge_tensors: a vocab-parallel tensor needs vocab_size to drop its padding rows")
        full = full[:vocab_size]
    return full.contiguous()


def shard_state(
    full: dict[str, torch.Tensor], layout: Layout, rank: int, size: int
) -> dict[str, torch.Tensor]:
    """Every tensor of a single-device state dict cut for ``rank`` (names not in ``layout`` are kept whole)."""
    return {
        name: shard_tensor(tensor, layout[name], rank, size, name) if name in layout else tensor
        for name, tensor in full.items()
    }


def merge_states(shards: list[dict[str, torch.Tensor]], layout: Layout, vocab_size: int) -> dict[str, torch.Tensor]:
    """The single-device state dict from the per-rank state dicts (rank order) of one tensor-parallel group.

    A replicated tensor is taken from rank 0. Every rank must hold the same names.
    """
    names = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            raise ValueError(
                f"tensor-parallel rank {rank} holds {sorted(set(shard) ^ set(names))[:6]} that rank 0 does not "
                "(or the reverse); the shards are not from one checkpoint"
            )
    return {
        name: merge_tensors([shard[name] for shard in shards], layout[name], vocab_size)
        if name in layout
        else shards[0][name]
        for name in names
    }
