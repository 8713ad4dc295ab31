"""Decoder pieces: rotary embeddings, RMSNorm, and the KV-cache attention of one decode step."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_core.kernels import packed_attention
from vlm_core.model.config import ModelConfig
from vlm_core.model.decoder import Decoder, RMSNorm, RotaryEmbedding, apply_rotary
from vlm_core.model.kv_cache import decode_attention


def rotate(vector: torch.Tensor, position: int, rotary: RotaryEmbedding) -> torch.Tensor:
    cos, sin = rotary(torch.tensor([position]), position + 1)
    return apply_rotary(vector.view(1, 1, -1), cos, sin).view(-1)


@pytest.mark.parametrize("head_dim", [8, 32])
def test_rope_dot_product_depends_only_on_position_difference(head_dim):
    rotary = RotaryEmbedding(head_dim, theta=10_000.0)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(head_dim, generator=generator, dtype=torch.float64).float()
    k = torch.randn(head_dim, generator=generator, dtype=torch.float64).float()
    for offset in (0, 3, 17):
        pairs = [(m, m - offset) for m in (offset, offset + 5, offset + 40, offset + 300)]
        dots = [torch.dot(rotate(q, m, rotary), rotate(k, n, rotary)).item() for m, n in pairs]
        # fp32 rotation of unit-scale vectors: each dot carries ~Dh ulps (~4e-6 at Dh=32); 1e-4 is 25x.
        assert max(dots) - min(dots) < 1e-4, f"offset {offset}: {dots}"
    # ...and it does depend on the difference, so the check above is not vacuous.
    near = torch.dot(rotate(q, 10, rotary), rotate(k, 9, rotary))
    far = torch.dot(rotate(q, 10, rotary), rotate(k, 2, rotary))
    assert (near - far).abs() > 1e-2


def test_rope_position_zero_is_identity_and_rotation_preserves_norm():
    rotary = RotaryEmbedding(16, theta=10_000.0)
    x = torch.randn(5, 3, 16)
    cos, sin = rotary(torch.tensor([0, 0, 0, 0, 0]), 1)
    assert torch.equal(apply_rotary(x, cos, sin), x)
    cos, sin = rotary(torch.tensor([1, 7, 100, 1000, 4000]), 4001)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))  # fp32 defaults


def test_rope_tables_grow_stay_fp32_and_stay_out_of_the_state_dict():
    cfg = ModelConfig(dim=32, layers=1, heads=4, kv_heads=2)
    decoder = Decoder(cfg, vocab_size=10).to(torch.bfloat16)
    cos, _ = decoder.rotary(torch.tensor([3000]), 3001)  # past the initial 256-entry table
    assert cos.dtype == torch.float32 and decoder.rotary._cos.shape[0] >= 3001
    angles = 3000 * 10_000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    torch.testing.assert_close(cos[0, :4], angles.cos().float())
    assert not any("rotary" in name for name in decoder.state_dict())


def test_rmsnorm_matches_formula():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(4, 8, dtype=torch.float64)
    want = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x.float()).double(), want, rtol=1e-6, atol=1e-6)  # fp32 vs float64


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 2)])
def test_decode_attention_matches_packed_attention_on_the_last_token(heads):
    # One sample per row, text only, different lengths: the last token of each sample under
    # packed_attention must equal decode_attention over the padded cache.
    num_q_heads, num_kv_heads = heads
    lengths = [1, 6, 13]
    total = sum(lengths)
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(total, num_q_heads, 16, generator=generator)
    k = torch.randn(total, num_kv_heads, 16, generator=generator)
    v = torch.randn(total, num_kv_heads, 16, generator=generator)
    cu_seqlens = torch.tensor([0, 1, 7, 20], dtype=torch.int32)
    full = packed_attention(q, k, v, cu_seqlens, 13)
    capacity = 16
    keys = torch.randn(3, num_kv_heads, capacity, 16, generator=generator)  # stale entries past each length
    values = torch.randn(3, num_kv_heads, capacity, 16, generator=generator)
    for row, (start, n) in enumerate(zip([0, 1, 7], lengths)):
        keys[row, :, :n] = k[start : start + n].transpose(0, 1)
        values[row, :, :n] = v[start : start + n].transpose(0, 1)
    last = cu_seqlens[1:].long() - 1
    got = decode_attention(q[last], keys, values, torch.tensor(lengths))
    # Same fp32 math in another reduction order: a few ulps on unit-scale outputs; 1e-5 is ~80 ulps.
    diff = (got - full[last]).abs()
    assert diff.max() < 1e-5, f"max err {diff.max():.3e}, mean err {diff.mean():.3e}"
    assert math.isfinite(got.sum().item())
