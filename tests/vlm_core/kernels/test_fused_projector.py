"""projector_scatter_triton against a float64 truth: the scattered rows and all six gradients.

The gradients checked: d embeds (zero at the overwritten rows), d features, d fc1 weight/bias and
d fc2 weight/bias, with one shared random d out over the whole packed buffer.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, check_close, generator, requires_cuda, run_with_grads

from vlm_core.kernels.fused_projector import (
    FusedProjector,
    fusable_projector_problem,
    projector_reference,
    projector_scatter,
    projector_scatter_reference,
    projector_scatter_triton,
)
from vlm_core.model.projector import Projector


def make_inputs(total, rows, dims, dtype, device, name, bias=True):
    g = generator(name)
    dim_v, dim_h, dim = dims
    embeds = torch.randn(total, dim, generator=g)
    features = torch.randn(len(rows), dim_v, generator=g)
    w1 = torch.randn(dim_h, dim_v, generator=g) / dim_v**0.5
    b1 = 0.1 * torch.randn(dim_h, generator=g)
    w2 = torch.randn(dim, dim_h, generator=g) / dim_h**0.5
    b2 = 0.1 * torch.randn(dim, generator=g)
    grad_out = torch.randn(total, dim, generator=g)
    tensors = [t.to(device=device, dtype=dtype) for t in (embeds, features, w1, b1, w2, b2, grad_out)]
    if not bias:
        tensors[3] = tensors[5] = None
    return tensors, torch.tensor(rows, dtype=torch.int64, device=device)


def check(total, rows, dims, dtype, device, name, bias=True):
    (embeds, features, w1, b1, w2, b2, grad_out), index = make_inputs(total, rows, dims, dtype, device, name, bias)
    params = [t for t in (embeds, features, w1, b1, w2, b2) if t is not None]

    def call(fn):
        def run(*leaves):
            leaves = list(leaves)
            e, f, weight1 = leaves[0] * 1, leaves[1], leaves[2]  # embeds as a non-leaf: the kernel writes it in place
            bias1 = leaves[3] if bias else None
            weight2 = leaves[4] if bias else leaves[3]
            bias2 = leaves[5] if bias else None
            return fn(e, f, index, weight1, bias1, weight2, bias2)

        return run

    ours = run_with_grads(call(projector_scatter_triton), params, grad_out)
    exact = run_with_grads(call(projector_scatter_reference), params, grad_out, cast=torch.float64)
    baseline = run_with_grads(call(projector_scatter_reference), params, grad_out)
    labels = ["out", "dembeds", "dfeatures", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"]
    if not bias:
        labels = [label for label in labels if "bias" not in label]
    errors = {}
    for label, got, want, base in zip(labels, ours, exact, baseline):
        assert got.dtype == dtype, f"{label}: {got.dtype}"
        errors[label] = check_close(label, got, want, base, dtype)
    assert torch.equal(ours[1][index], torch.zeros_like(ours[1][index])), "overwritten rows got a gradient"
    return errors


# (total, image rows, (D_v, D_h, D), dtype, biases): one image token; rows at the start, middle and
# end of the buffer and back to back (two images); widths that are not multiples of the tiles.
CPU_CASES = [
    (5, [2], (16, 24, 8), torch.float32, True),
    (40, [0, 1, 2, 3, 17, 18, 19, 20, 36, 37, 38, 39], (24, 40, 36), torch.float32, True),
    (40, list(range(4, 22)), (24, 40, 36), torch.float32, False),
    (40, [0, 1, 2, 3, 17, 18, 19, 20, 36, 37, 38, 39], (24, 40, 36), torch.bfloat16, True),
    (33, list(range(5, 23)), (32, 48, 20), torch.float16, True),
]


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("total", "rows", "dims", "dtype", "bias"), CPU_CASES,
                         ids=[f"total{c[0]}-m{len(c[1])}-{c[2]}-{str(c[3])[6:]}-bias{c[4]}" for c in CPU_CASES])  # fmt: skip
def test_matches_reference(total, rows, dims, dtype, bias):
    check(total, rows, dims, dtype, DEVICE, f"proj-{total}-{len(rows)}-{dims}-{dtype}-{bias}", bias)


@requires_cuda
@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_gpu_sizes(dtype):
    """LLaVA-1.5 widths: 4 images of 576 tokens in a 3,000-token buffer, D_v 1024, D_h = D = 4096."""
    rows = [r for start in (10, 700, 1300, 2400) for r in range(start, start + 576)]
    check(3000, rows, (1024, 4096, 4096), dtype, "cuda", f"proj-gpu-{dtype}")


@pytest.mark.usefixtures("triton_kernels")
def test_fused_module_keeps_the_projector_state_dict_and_output():
    torch.manual_seed(0)
    plain = Projector(24, 40, 36)
    fused = FusedProjector(24, 40, 36)
    fused.load_state_dict(plain.state_dict())
    plain.load_state_dict(fused.state_dict())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert fusable_projector_problem(plain) == ""
    features = torch.randn(3, 4, 24)
    torch.testing.assert_close(fused.to(DEVICE)(features.to(DEVICE)).cpu(), plain(features), rtol=0, atol=2e-6)


@pytest.mark.usefixtures("triton_kernels")
def test_layer_norm_variant_and_autocast():
    torch.manual_seed(0)
    fused = FusedProjector(24, 40, 36, layer_norm=True).to(DEVICE)
    fused.norm.weight.data.normal_()
    features = torch.randn(6, 24, device=DEVICE)
    embeds = torch.randn(10, 36, device=DEVICE)
    rows = torch.tensor([1, 2, 3, 6, 7, 8], device=DEVICE)
    args = (fused.fc1.weight, fused.fc1.bias, fused.fc2.weight, fused.fc2.bias, fused.norm.weight, fused.norm.bias)
    want = projector_scatter_reference(embeds, features, rows, *args)
    got = fused(features, embeds.clone(), rows)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # GEMMs in bf16, stored into the fp32 buffer
        got = projector_scatter(embeds.clone(), features, rows, *args[:4], impl="triton")
        want = projector_scatter(embeds.clone(), features, rows, *args[:4])
    assert got.dtype == torch.float32
    exact = projector_scatter(embeds.double(), features.double(), rows, *(a.double() for a in args[:4]))
    # The STYLE.md rule against the float64 truth, with the reference under autocast as the bf16 baseline
    # (measured on the CPU: ours 2.6e-3, baseline 4.4e-3; an rtol/atol of 0.02 allowed ~25x that).
    check_close("autocast out", got, exact, want, torch.bfloat16)


def test_a_projector_that_is_not_two_linears_is_not_fused():
    class Sharded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Identity()
            self.fc2 = torch.nn.Linear(2, 2)

    assert "not a plain nn.Linear" in fusable_projector_problem(Sharded())
    assert torch.equal(projector_reference(torch.ones(1, 2), torch.eye(2), None, torch.eye(2), None),
                       torch.nn.functional.gelu(torch.ones(1, 2)))  # fmt: skip


@pytest.mark.usefixtures("triton_kernels")
def test_limits_raise_value_error():
    (embeds, features, w1, b1, w2, b2, _), rows = make_inputs(8, [1, 2], (8, 16, 4), torch.float32, DEVICE, "lim")
    with pytest.raises(ValueError, match="do not chain"):
        projector_scatter_triton(embeds, features, rows, w1, b1, w2[:, :8], b2)
    with pytest.raises(ValueError, match="rows must be"):
        projector_scatter_triton(embeds, features, rows[:1], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="float64"):
        projector_scatter_triton(embeds.double(), features, rows, w1, b1, w2, b2)
