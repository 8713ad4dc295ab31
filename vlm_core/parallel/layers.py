"""megatron-core's tensor-parallel layers, shaped like the torch modules they replace.

Each class here *is* the megatron-core layer (``ColumnParallelLinear``, ``RowParallelLinear``,
``VocabParallelEmbedding``: same autograd functions, same collectives), with three differences that let it
drop into single-device model code:

- ``forward(x)`` returns a tensor, as ``nn.Linear`` does, not megatron's ``(output, bias)`` pair;
- the state dict holds ``weight`` (and ``bias``) only, without megatron's empty ``_extra_state``, so a
  sharded model has the single-device model's names (and shard shapes);
- ``from_linear`` / ``from_embedding`` build the layer from a single-device module, cutting this rank's shard
  out of its weights (:mod:`vlm_core.parallel.reshard`). megatron's initialisation is off
  (``perform_initialization=False``): its GPU path forks the CUDA RNG tracker, and cutting one shared init is
  what makes TP=n start from the TP=1 weights.

Under CPU bf16 autocast the layers compute in fp32: megatron's linear autograd functions re-enter only CUDA
autocast in their backward, so on the CPU the bf16 activations met fp32 weights there and failed
("expected m1 and m2 to have the same dtype"). On CUDA autocast works as in megatron.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from vlm_core.parallel.reshard import ShardSpec, padded_vocab_size, shard_tensor

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected on the CPU
    warnings.simplefilter("ignore")
    from megatron.core import ModelParallelConfig
    from megatron.core import tensor_parallel as megatron_tp
    from megatron.core.tensor_parallel.layers import (
        set_tensor_model_parallel_attributes,
    )


def _config(tp_size: int, dtype: torch.dtype) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size, use_cpu_initialization=True, perform_initialization=False,
        params_dtype=dtype,
    )


def _no_init(weight: torch.Tensor) -> None:  # weights are copied from the single-device module
    return None


def _in_fp32_under_cpu_autocast(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return forward(x.float())
    return forward(x)


def _mark_split(param: torch.Tensor, dim: int, stride: int = 1) -> None:
    """megatron's tensor_model_parallel / partition_dim / partition_stride attributes (read by grad clipping)."""
    if not hasattr(param, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(param, True, dim, stride)


def _load_weights(layer: nn.Module, source: nn.Module, shards: dict[str, torch.Tensor]) -> None:
    """Move ``layer`` to the source's device and copy the shards in; the parameters keep their identity."""
    layer.to(source.weight.device)
    with torch.no_grad():
        for name, shard in shards.items():
            param = getattr(layer, name)
            param.copy_(shard)
            param.requires_grad_(getattr(source, name).requires_grad)


class _PlainStateDict(nn.Module):
    """Drops megatron's ``_extra_state`` (always None for these layers) from the state dict."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hook(self) -> None:
        self._load_state_dict_pre_hooks.clear()  # megatron's hook inserts "_extra_state" into every load


class ColumnParallelLinear(_PlainStateDict, megatron_tp.ColumnParallelLinear):
    """y = x A_r^T + b_r: this rank's slice of the output features.

    x: (..., in_features), the same on every rank of the group -> (..., out_features / tp).
    ``reduce_input_grad=False`` leaves the all-reduce of x's gradient to the caller (the vocab-parallel LM
    head, whose caller reduces once for the tied and the untied head alike).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp_size: int, stride: int = 1,
        reduce_input_grad: bool = True, dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            in_features, out_features, config=_config(tp_size, dtype), init_method=_no_init, bias=bias,
            gather_output=False, stride=stride, skip_bias_add=False, disable_grad_reduce=not reduce_input_grad,
        )
        self._drop_extra_state_hook()
        _mark_split(self.weight, dim=0, stride=stride)  # megatron marks the bias itself, the weight only on init

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, tp_rank: int, tp_size: int, stride: int = 1, reduce_input_grad: bool = True,
        vocab: bool = False,
    ) -> ColumnParallelLinear:
        out_features = padded_vocab_size(linear.out_features, tp_size) if vocab else linear.out_features
        layer = cls(linear.in_features, out_features, linear.bias is not None, tp_size, stride, reduce_input_grad,
                    linear.weight.dtype)
        spec = ShardSpec(dim=0, stride=stride, vocab=vocab)
        shards = {"weight": shard_tensor(linear.weight.detach(), spec, tp_rank, tp_size, "weight")}
        if linear.bias is not None:
            shards["bias"] = shard_tensor(linear.bias.detach(), spec, tp_rank, tp_size, "bias")
        _load_weights(layer, linear, shards)
        return layer

    def _column_forward(self, x: torch.Tensor) -> torch.Tensor:
        return megatron_tp.ColumnParallelLinear.forward(self, x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _in_fp32_under_cpu_autocast(self._column_forward, x)


class RowParallelLinear(_PlainStateDict, megatron_tp.RowParallelLinear):
    """y = all_reduce(x_r A_r^T) + b: this rank's input slice in, the full output out (bias replicated).

    x: (..., in_features / tp), this rank's slice (a column-parallel layer's output) -> (..., out_features).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp_size: int, dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            in_features, out_features, config=_config(tp_size, dtype), init_method=_no_init, bias=bias,
            input_is_parallel=True, skip_bias_add=False,
        )
        self._drop_extra_state_hook()
        _mark_split(self.weight, dim=1)

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp_rank: int, tp_size: int) -> RowParallelLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, tp_size, linear.weight.dtype)
        shards = {"weight": shard_tensor(linear.weight.detach(), ShardSpec(dim=1), tp_rank, tp_size, "weight")}
        if linear.bias is not None:
            shards["bias"] = linear.bias.detach()
        _load_weights(layer, linear, shards)
        return layer

    def _row_forward(self, x: torch.Tensor) -> torch.Tensor:
        return megatron_tp.RowParallelLinear.forward(self, x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _in_fp32_under_cpu_autocast(self._row_forward, x)


class VocabParallelEmbedding(_PlainStateDict, megatron_tp.VocabParallelEmbedding):
    """Rows [vocab_start_index, vocab_end_index) of the embedding table on this rank; lookups all-reduced.

    ids: (...,) int64 in [0, vocab_size) -> (..., D), the same on every rank. The table is padded with zero
    rows to a multiple of the TP size (``padded_vocab_size``); no id reaches them, and the LM head masks
    their logits (:func:`vlm_core.parallel.loss.vocab_parallel_logits`).
    """

    def __init__(self, vocab_size: int, dim: int, tp_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(
            padded_vocab_size(vocab_size, tp_size), dim, init_method=_no_init, config=_config(tp_size, dtype),
        )
        self._drop_extra_state_hook()
        self.vocab_size = vocab_size  # without padding
        _mark_split(self.weight, dim=0)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, tp_rank: int, tp_size: int) -> VocabParallelEmbedding:
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, tp_size, embedding.weight.dtype)
        shard = shard_tensor(embedding.weight.detach(), ShardSpec(dim=0, vocab=True), tp_rank, tp_size, "weight")
        _load_weights(layer, embedding, {"weight": shard})
        return layer
