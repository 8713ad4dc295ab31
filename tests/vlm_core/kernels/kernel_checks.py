"""Shared by the fused-kernel tests: run an op with gradients, and the STYLE.md tolerance rule.

The rule (flash-attention's): the kernel's error against a float64 truth is at most 2x the error of the
plain PyTorch reference run in the kernel's own dtype, plus a floor:
- float32: 8 ulps of max(|truth|, 1). Kernel and baseline are both at rounding level (~1e-7) with
  different summation orders, and the baseline is sometimes exact where the kernel is off by an ulp
  or two; a wrong index, mask or formula moves values by O(0.1), far above it.
- float16/bfloat16: 1 ulp of the half dtype at max(|truth|, 1), for outputs the baseline happens to
  get exact (a copy, a zero gradient) while the kernel's single rounding of a float32 value is off by
  one ulp. Half-precision baselines otherwise err by several ulps, so 2x of that dominates.
"""

from __future__ import annotations

import importlib.util
import sys
import zlib

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def requires_cuda(test):
    """A test at real sizes on a GPU: skipped elsewhere, and marked ``gpu`` so that a GPU session can run these
    alone with full autotuning (scripts/gpu_session.sh check)."""
    skip = pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
    return pytest.mark.gpu(skip(test))


def generator(text: str) -> torch.Generator:
    """A CPU generator seeded from a case's name, so every case draws its own fresh inputs."""
    return torch.Generator().manual_seed(zlib.crc32(text.encode()))


def run_with_grads(fn, inputs, grad_out, cast=None, trainable=None):
    """[output, grad of each input] of fn(*inputs) with the shared grad_out; inputs cast to ``cast`` first.
    Every floating-point input requires grad, or those with a true entry in ``trainable`` (one per input)."""
    trainable = [x.is_floating_point() for x in inputs] if trainable is None else trainable
    leaves = [x.detach().clone().to(cast or x.dtype).requires_grad_(t) for x, t in zip(inputs, trainable, strict=True)]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves if leaf.requires_grad]


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


def check_close(name: str, got: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype) -> float:
    """Assert the tolerance rule above; returns the kernel's max error. The message carries the numbers."""
    scale = max(truth.abs().max().item() if truth.numel() else 0.0, 1.0)
    ulps = 8 if dtype == torch.float32 else 1
    floor = ulps * torch.finfo(dtype).eps * scale
    bound = 2 * max_err(baseline, truth) + floor
    diff = (got.double() - truth.double()).abs()
    report = (
        f"{name}: max err {max_err(got, truth):.3e}, mean err {diff.mean().item() if diff.numel() else 0:.3e}, "
        f"baseline max err {max_err(baseline, truth):.3e}, bound {bound:.3e}, "
        f"nan {torch.isnan(got).sum().item()}, inf {torch.isinf(got).sum().item()}"
    )
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(got).all(), report
    assert max_err(got, truth) <= bound, report
    return max_err(got, truth)


def import_triton_for_the_interpreter() -> None:
    """Import triton with TRITON_INTERPRET=1 if nothing has imported it yet (see tests/conftest.py)."""
    if HAS_TRITON and not CUDA and "triton" not in sys.modules:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TRITON_INTERPRET", "1")
            importlib.import_module("triton.language")


# ------------------------------------------------------------------------------ packed-attention helpers
# A layout is a list of samples; a sample is a list of spans ("t", n) text or ("i", n) one image.


def layout_tensors(layout, device="cpu"):
    """cu_seqlens [n+1] int32, bidir_group [total] int32 (a fresh id per image), sample ids [total] int64."""
    cu, groups, samples = [0], [], []
    image_id = 0
    for sample_index, spans in enumerate(layout):
        for kind, n in spans:
            if kind == "i":
                image_id += 1
            groups += [image_id if kind == "i" else 0] * n
            samples += [sample_index] * n
        cu.append(len(groups))
    return (
        torch.tensor(cu, dtype=torch.int32, device=device),
        torch.tensor(groups, dtype=torch.int32, device=device),
        torch.tensor(samples),
    )


def dense_attention(q, k, v, mask, scale):
    """Plain attention with an explicit [total, total] mask, computed in the inputs' dtype."""
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    outputs = []
    for h in range(num_q_heads):
        kv = h // (num_q_heads // num_kv_heads)
        scores = (q[:, h] @ k[:, kv].T) * scale  # [total, total]
        scores = scores.masked_fill(~mask, float("-inf"))
        outputs.append(torch.softmax(scores, dim=-1) @ v[:, kv])  # [total, Dh]
    return torch.stack(outputs, dim=1)  # [total, Hq, Dh]


def error_report(name, got, want, baseline=None, bound=None):
    """The numbers an assertion message carries: errors of ``got`` (and ``baseline``) against ``want``."""
    diff = (got.double() - want.double()).abs()
    text = f"{name}: max err {diff.max().item():.3e}, mean err {diff.mean().item():.3e}, "
    if baseline is not None:
        text += f"baseline max err {max_err(baseline, want):.3e}, "
    if bound is not None:
        text += f"bound {bound:.3e}, "
    return text + f"nan {torch.isnan(got).sum().item()}, inf {torch.isinf(got).sum().item()}"
