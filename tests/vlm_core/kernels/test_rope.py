"""rope_triton_ rotates q and k in place exactly as the decoder's apply_rotary, forward and backward."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, check_close, generator, requires_cuda

from vlm_core.kernels.rope import rope_, rope_reference, rope_triton_, rotate_reference
from vlm_core.model.decoder import RotaryEmbedding, apply_rotary


def packed_positions(lengths, device):
    """position_ids restarting per sample, as the packer makes them."""
    return torch.cat([torch.arange(n) for n in lengths]).to(device)


def run(rotate, x, heads, head_dim, grad_q, grad_k, dtype):
    """q, k as views of a projection's output (as in the decoder), rotated, and d x through the projection."""
    x = x.detach().clone().requires_grad_(True)
    total = x.shape[0]
    projection = x.to(dtype) @ torch.ones(x.shape[1], (heads[0] + heads[1]) * head_dim, dtype=dtype, device=x.device)
    q = projection[:, : heads[0] * head_dim].reshape(total, heads[0], head_dim)  # views with a token stride
    k = projection[:, heads[0] * head_dim :].reshape(total, heads[1], head_dim)  # of (Hq + Hkv) * Dh
    q_rot, k_rot = rotate(q, k)
    ((q_rot.double() * grad_q.double()).sum() + (k_rot.double() * grad_k.double()).sum()).backward()
    return q_rot.detach(), k_rot.detach(), x.grad


# (sample lengths, (Hq, Hkv), Dh, dtype, positions through the table): GQA ratios 1, 4 and 3 (6/2),
# Dh/2 not a power of two (24 -> 12), lengths 1, 113, 203.
CPU_CASES = [
    ([1], (2, 2), 16, torch.float32, False),
    ([113, 1, 40], (8, 2), 24, torch.float32, True),
    ([203], (6, 2), 32, torch.bfloat16, False),
    ([30, 70], (4, 1), 64, torch.float16, True),
]


def check(lengths, heads, head_dim, dtype, with_positions, device, name):
    g = generator(name)
    total = sum(lengths)
    rotary = RotaryEmbedding(head_dim, 10_000.0)
    positions = packed_positions(lengths, device)
    cos, sin = rotary(positions, max(lengths))  # [total, Dh]: the per-token rows the decoder passes
    tables = rotary._tables(max(lengths), torch.device(device))
    x = torch.randn(total, 3, generator=g).to(device)
    grad_q = torch.randn(total, heads[0], head_dim, generator=g).to(device)
    grad_k = torch.randn(total, heads[1], head_dim, generator=g).to(device)
    if with_positions:
        ours = run(lambda q, k: rope_triton_(q, k, *tables, positions), x, heads, head_dim, grad_q, grad_k, dtype)
    else:
        ours = run(lambda q, k: rope_triton_(q, k, cos, sin), x, heads, head_dim, grad_q, grad_k, dtype)
    baseline = run(lambda q, k: rope_reference(q, k, cos, sin), x, heads, head_dim, grad_q, grad_k, dtype)
    exact = run(lambda q, k: (rotate_reference(q, cos.double(), sin.double()), rotate_reference(k, cos.double(), sin.double())),
                x.double(), heads, head_dim, grad_q, grad_k, torch.float64)  # fmt: skip
    for label, got, want, base in zip(("q", "k", "dx"), ours, exact, baseline):
        check_close(label, got, want, base, dtype if label != "dx" else torch.float32)
    return ours, baseline


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("lengths", "heads", "head_dim", "dtype", "with_positions"), CPU_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))  # fmt: skip
def test_matches_reference(lengths, heads, head_dim, dtype, with_positions):
    ours, baseline = check(lengths, heads, head_dim, dtype, with_positions, DEVICE,
                           f"rope-{lengths}-{heads}-{head_dim}-{dtype}-{with_positions}")  # fmt: skip
    if not torch.cuda.is_available():
        # Same float32 products and sum, term by term: the interpreter reproduces the reference exactly.
        for got, want in zip(ours, baseline):
            assert torch.equal(got, want)


@requires_cuda
@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_gpu_sizes(dtype):
    check([1023, 1, 113, 203, 4096, 8192], (32, 8), 128, dtype, True, "cuda", f"rope-gpu-{dtype}")


@pytest.mark.usefixtures("triton_kernels")
def test_in_place_without_autograd_rotates_q_and_k_in_one_launch():
    g = generator("rope-nograd")
    q = torch.randn(50, 4, 16, generator=g).to(DEVICE)
    k = torch.randn(50, 2, 16, generator=g).to(DEVICE)
    cos, sin = RotaryEmbedding(16, 10_000.0)(packed_positions([20, 30], DEVICE), 30)
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    with torch.no_grad():
        got_q, got_k = rope_(q, k, cos, sin, impl="triton")
    assert got_q is q and got_k is k
    torch.testing.assert_close(q, want_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(k, want_k, rtol=0, atol=1e-6)


def test_reference_is_the_decoder_rotation():
    g = generator("rope-decoder")
    q, k = torch.randn(9, 4, 8, generator=g), torch.randn(9, 2, 8, generator=g)
    cos, sin = RotaryEmbedding(8, 10_000.0)(torch.arange(9), 9)
    got_q, got_k = rope_(q, k, cos, sin)
    assert torch.equal(got_q, apply_rotary(q, cos, sin)) and torch.equal(got_k, apply_rotary(k, cos, sin))


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(
    ("q_shape", "k_shape", "cos_rows", "message"),
    [((4, 2, 6), (4, 1, 7), 4, "tokens and head_dim"), ((4, 2, 5), (4, 1, 5), 4, "must be even"),
     ((4, 2, 8), (4, 1, 8), 3, "one row per token")],
)
def test_limits_raise_value_error(q_shape, k_shape, cos_rows, message):
    q, k = torch.ones(q_shape, device=DEVICE), torch.ones(k_shape, device=DEVICE)
    table = torch.ones(cos_rows, q_shape[2], device=DEVICE)
    with pytest.raises(ValueError, match=message):
        rope_triton_(q, k, table, table)
