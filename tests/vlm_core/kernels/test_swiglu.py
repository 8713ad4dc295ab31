"""swiglu_triton against a float64 truth: output, d gate, d up; FusedSwiGLU keeps the decoder SwiGLU's state dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, check_close, generator, requires_cuda, run_with_grads

from vlm_core.kernels.swiglu import FusedSwiGLU, swiglu, swiglu_reference, swiglu_triton
from vlm_core.model.config import ModelConfig
from vlm_core.model.decoder import SwiGLU


def check(shape, dtype, device, name):
    g = generator(name)
    gate, up, grad_out = (torch.randn(shape, generator=g).mul(2).to(device=device, dtype=dtype) for _ in range(3))
    ours = run_with_grads(swiglu_triton, (gate, up), grad_out)
    exact = run_with_grads(swiglu_reference, (gate, up), grad_out, cast=torch.float64)
    baseline = run_with_grads(swiglu_reference, (gate, up), grad_out)
    for label, got, want, base in zip(("y", "dgate", "dup"), ours, exact, baseline):
        assert got.dtype == dtype, f"{label}: {got.dtype}"
        check_close(label, got, want, base, dtype)


CPU_CASES = [((1, 1), torch.float32), ((113, 352), torch.float32), ((7, 203), torch.float32),
             ((113, 352), torch.bfloat16), ((3, 5, 203), torch.float16)]


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("shape", "dtype"), CPU_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference(shape, dtype):
    check(shape, dtype, DEVICE, f"swiglu-{shape}-{dtype}")


@requires_cuda
@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("shape", "dtype"), [((16384, 5632), torch.bfloat16), ((4093, 11008), torch.float16)])
def test_matches_reference_gpu_sizes(shape, dtype):
    check(shape, dtype, "cuda", f"swiglu-gpu-{shape}-{dtype}")


@pytest.mark.usefixtures("triton_kernels")
def test_fused_module_matches_the_decoder_swiglu_and_its_state_dict():
    cfg = ModelConfig(dim=32, heads=4, kv_heads=2, mlp_hidden=40)
    torch.manual_seed(0)
    plain = SwiGLU(cfg)
    fused = FusedSwiGLU(32, 40)
    fused.load_state_dict(plain.state_dict())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(9, 32)
    torch.testing.assert_close(fused.to(DEVICE)(x.to(DEVICE)).cpu(), plain(x), rtol=0, atol=1e-6)  # fp32 rounding
    assert torch.equal(swiglu(x, x), F.silu(x) * x)


@pytest.mark.usefixtures("triton_kernels")
def test_limits_raise_value_error():
    with pytest.raises(ValueError, match="must match"):
        swiglu_triton(torch.ones(3, 4, device=DEVICE), torch.ones(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="float64"):
        swiglu_triton(torch.ones(3, dtype=torch.float64, device=DEVICE), torch.ones(3, dtype=torch.float64, device=DEVICE))
