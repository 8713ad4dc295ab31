"""rmsnorm_triton against a float64 truth: output, d x and d weight; the reference is the decoder's RMSNorm."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, check_close, generator, requires_cuda, run_with_grads

from vlm_core.kernels.rmsnorm import (
    FusedRMSNorm,
    rmsnorm,
    rmsnorm_reference,
    rmsnorm_triton,
)
from vlm_core.model.decoder import RMSNorm

EPS = 1e-5


def truth(x, weight):
    """RMSNorm in float64 without the reference's rounding of the normed row."""
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()


def check(shape, dtype, weight_dtype, device, name):
    g = generator(name)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device=device, dtype=weight_dtype)
    grad_out = torch.randn(shape, generator=g).to(device=device, dtype=torch.promote_types(dtype, weight_dtype))
    ours = run_with_grads(lambda x_, w_: rmsnorm_triton(x_, w_, EPS), (x, weight), grad_out)
    exact = run_with_grads(truth, (x, weight), grad_out, cast=torch.float64)
    baseline = run_with_grads(lambda x_, w_: rmsnorm_reference(x_, w_, EPS), (x, weight), grad_out)
    assert ours[0].dtype == baseline[0].dtype and ours[1].dtype == dtype and ours[2].dtype == weight_dtype
    for label, got, want, base in zip(("y", "dx", "dweight"), ours, exact, baseline):
        check_close(label, got, want, base, dtype if label != "dweight" else weight_dtype)


# (shape, x dtype, weight dtype): lengths 1, 113, 203, a width that is not a power of two, more rows
# than one backward program covers, 3-d input, and x in bf16 with an fp32 weight (the model under autocast).
CPU_CASES = [
    ((1, 1), torch.float32, torch.float32),
    ((113, 96), torch.float32, torch.float32),
    ((7, 203), torch.float32, torch.float32),
    ((300, 64), torch.bfloat16, torch.bfloat16),
    ((113, 96), torch.bfloat16, torch.bfloat16),
    ((7, 203), torch.float16, torch.float16),
    ((2, 3, 40), torch.bfloat16, torch.float32),
]


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("shape", "dtype", "weight_dtype"), CPU_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference(shape, dtype, weight_dtype):
    check(shape, dtype, weight_dtype, DEVICE, f"rmsnorm-{shape}-{dtype}-{weight_dtype}")


@requires_cuda
@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("shape", "dtype"), [((16384, 2048), torch.bfloat16), ((4093, 4096), torch.float16),
                                              ((1023, 8192), torch.bfloat16), ((4096, 4096), torch.float32)])
def test_matches_reference_gpu_sizes(shape, dtype):
    check(shape, dtype, dtype, "cuda", f"rmsnorm-gpu-{shape}-{dtype}")


def test_reference_is_the_decoder_rmsnorm():
    g = generator("rmsnorm-decoder")
    module = RMSNorm(48, EPS)
    module.weight.data = torch.randn(48, generator=g)
    x = torch.randn(5, 48, generator=g).to(torch.bfloat16)
    assert torch.equal(module(x), rmsnorm_reference(x, module.weight, EPS))
    assert torch.equal(rmsnorm(x, module.weight, EPS), rmsnorm_reference(x, module.weight, EPS))


def test_fused_module_keeps_the_state_dict():
    plain, fused = RMSNorm(32, EPS), FusedRMSNorm(32, EPS)
    plain.weight.data.normal_()
    fused.load_state_dict(plain.state_dict())
    plain.load_state_dict(fused.state_dict())
    assert fused.state_dict().keys() == plain.state_dict().keys() and torch.equal(fused.weight, plain.weight)


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(
    ("x_shape", "weight_shape", "dtype", "message"),
    [((4, 8), (7,), torch.float32, "weight has shape"), ((4, 8), (8,), torch.float64, "float64"),
     ((4, 70000), (70000,), torch.float32, "65536")],
)
def test_limits_raise_value_error(x_shape, weight_shape, dtype, message):
    x = torch.ones(x_shape, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        rmsnorm_triton(x, torch.ones(weight_shape, dtype=dtype, device=DEVICE), EPS)
