"""Shard / merge maths of tensor-parallel checkpoints (no processes): TP=a -> merged -> TP=b is exact."""

from __future__ import annotations

import pytest
import torch

from vlm_core.model.config import ModelConfig, VisionConfig
from vlm_core.model.vlm import VLM
from vlm_core.parallel.plan import check_divisible, shard_layout
from vlm_core.parallel.reshard import (
    ShardSpec,
    merge_states,
    merge_tensors,
    padded_vocab_size,
    shard_state,
    shard_tensor,
)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("spec", [ShardSpec(0), ShardSpec(1), ShardSpec(0, stride=3), ShardSpec(0, vocab=True)])
def test_shard_then_merge_is_exact(size: int, spec: ShardSpec) -> None:
    rows = 113 if spec.vocab else 24 * spec.stride  # 113 tokens: padded to a multiple of every size
    full = torch.randn(rows, 36)
    shards = [shard_tensor(full, spec, rank, size) for rank in range(size)]
    assert len({tuple(s.shape) for s in shards}) == 1, "every rank must hold the same shape"
    assert torch.equal(merge_tensors(shards, spec, vocab_size=rows), full)


def test_fused_qkv_shard_holds_its_heads_of_q_k_and_v() -> None:
    heads, head_dim, dim = 4, 3, 5
    q, k, v = (torch.randn(heads * head_dim, dim) for _ in range(3))
    shard = shard_tensor(torch.cat([q, k, v]), ShardSpec(0, stride=3), rank=1, size=2)
    expected = torch.cat([q[6:], k[6:], v[6:]])  # heads 2 and 3 of each
    assert torch.equal(shard, expected)


def test_vocab_padding_rows_are_zero_and_dropped_again() -> None:
    table = torch.randn(101, 8)
    last = shard_tensor(table, ShardSpec(0, vocab=True), rank=3, size=4)
    assert padded_vocab_size(101, 4) == 104 and last.shape == (26, 8)
    assert torch.equal(last[-3:], torch.zeros(3, 8)) and torch.equal(last[:-3], table[78:])


def tiny_vlm() -> VLM:
    vision = VisionConfig(image_size=32, patch_size=16, dim=32, layers=2, heads=2)
    return VLM(ModelConfig(vision=vision, dim=64, layers=2, heads=4, kv_heads=2), vocab_size=101, image_token_id=100)


def test_tp2_shards_regroup_into_tp4_and_back() -> None:
    model = tiny_vlm()
    full = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    layout = shard_layout(model)
    assert layout["decoder.layers.0.attention.o_proj.weight"] == ShardSpec(1)
    assert layout["vision.blocks.1.attention.qkv.bias"] == ShardSpec(0, stride=3)
    assert layout["decoder.embed_tokens.weight"] == ShardSpec(0, vocab=True)
    assert "decoder.norm.weight" not in layout and "vision.blocks.0.mlp.fc2.bias" not in layout  # replicated
    tp2 = [shard_state(full, layout, rank, 2) for rank in range(2)]
    merged = merge_states(tp2, layout, vocab_size=101)
    tp4 = [shard_state(merged, layout, rank, 4) for rank in range(4)]
    again = merge_states(tp4, layout, vocab_size=101)
    assert all(torch.equal(again[name], full[name]) for name in full)


def test_tensor_parallel_size_must_divide_the_heads() -> None:
    model = tiny_vlm()
    check_divisible(model, 2)
    with pytest.raises(ValueError, match="model.kv_heads=2"):
        check_divisible(model, 4)
