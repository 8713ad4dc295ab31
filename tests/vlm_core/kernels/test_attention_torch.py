"""The PyTorch peers of packed attention (sdpa, flex, varlen, flash_attn) against the reference, and
the choice of implementation (resolve_attn_impl) with its fallbacks and log messages."""

from __future__ import annotations


import inspect
import logging
import math
import os
import sys
import types
import zlib

import pytest
import torch
from kernel_checks import error_report, layout_tensors, max_err

from vlm_core import kernels
from vlm_core.kernels import (
    attn_impl_status,
    packed_attention,
    packed_attention_reference,
    resolve_attn_impl,
)
from vlm_core.kernels.attention_torch import packed_attention_mask_mod, varlen_causal_keywords

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# A layout is a list of samples; a sample is a list of spans ("t", n) text or ("i", n) one image.
LAYOUTS = {
    "len1": [[("t", 1)]],
    "len113_image_middle": [[("t", 40), ("i", 16), ("t", 57)]],
    "len203_images_start_middle_end": [[("i", 16), ("t", 100), ("i", 9), ("t", 62), ("i", 16)]],
    "mixed_batch": [
        [("t", 1)],
        [("t", 3), ("i", 9), ("t", 25)],
        [("t", 5), ("i", 4), ("t", 2), ("i", 4), ("t", 3)],  # two images in one sample
        [("i", 16), ("t", 1)],
        [("t", 19)],  # trailing padding of a row: its own text segment
    ],
    # n * max_seqlen^2 > total^2: sdpa takes its dense block-diagonal layout instead of the padded one.
    "many_short_one_long": [[("t", 1)]] * 12 + [[("t", 2), ("i", 9)]] * 4 + [[("t", 30), ("i", 16), ("t", 67)]],
}
TEXT_LAYOUTS = {  # causal-only: what varlen and flash_attn can serve
    "text_len1": [[("t", 1)]],
    "text_len113_203": [[("t", 113)], [("t", 203)], [("t", 7)]],
}
HEADS = [(4, 4), (6, 2)]  # (Hq, Hkv): no GQA, and GQA ratio 3 with a head count that is not a power of 2


def build_layout(layout):
    """cu_seqlens [n+1] int32, bidir_group [total] int32 (unique id per image), max_seqlen."""
    cu_seqlens, groups, _ = layout_tensors(layout)
    return cu_seqlens, groups, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def random_inputs(name: str, total: int, heads: tuple[int, int], head_dim: int, device: str):
    """Fresh q, k, v and a shared grad_out, seeded by the test's name (never zeros)."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    num_q_heads, num_kv_heads = heads
    shapes = [(total, num_q_heads, head_dim), (total, num_kv_heads, head_dim), (total, num_kv_heads, head_dim)]
    q, k, v = (torch.randn(shape, generator=generator).to(device) for shape in shapes)
    grad_out = torch.randn(total, num_q_heads, head_dim, generator=generator).to(device)
    return (q, k, v), grad_out


def run(impl, inputs, grad_out, cu_seqlens, max_seqlen, groups, dtype, backward=True):
    """[out, dq, dk, dv] of one impl on inputs cast to dtype (out only without backward)."""
    leaves = [x.detach().to(dtype).requires_grad_(backward) for x in inputs]
    out = packed_attention(*leaves, cu_seqlens, max_seqlen, groups, impl=impl)
    if not backward:
        return [out.detach()]
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def check_against_reference(impl, layout_name, layout, heads, head_dim, dtype, device, backward):
    """[out, dq, dk, dv] of ``impl`` in ``dtype``, of the float64 reference, and of the reference in
    ``dtype`` (the baseline: plain PyTorch at that precision; it upcasts to fp32 internally)."""
    cu_seqlens, groups, max_seqlen = build_layout(layout)
    cu_seqlens, groups = cu_seqlens.to(device), groups.to(device)
    inputs, grad_out = random_inputs(f"{impl}-{layout_name}-{heads}-{head_dim}-{dtype}", groups.numel(), heads, head_dim, device)
    if dtype != torch.float32:
        inputs = [x.to(dtype) for x in inputs]  # the exact inputs every run sees
    ours = run(impl, inputs, grad_out, cu_seqlens, max_seqlen, groups, dtype, backward)
    want = run("reference", inputs, grad_out, cu_seqlens, max_seqlen, groups, torch.float64, backward)
    baseline = run("reference", inputs, grad_out, cu_seqlens, max_seqlen, groups, dtype, backward)
    return ours, want, baseline


def rounding_floor(ref: torch.Tensor) -> float:
    """8 float32 ulps at the scale of the terms summed: max(|ref|, sqrt(Dh)). Kernels accumulate in float32
    in their own order, so the baseline is sometimes luckier by a few x, or exact where the true value is 0:
    dq of a length-1 segment is P (dP - D) k with P = 1 and dP = D = dO . v, a cancellation of two sums of
    Dh unit-normal products (|dP| ~ sqrt(Dh)). The plain bf16 baseline gets it exactly 0; on an H100,
    sdpa (fp32) left 1.1e-6 and varlen_attn (bf16) 3.2e-7 there at Dh 64, over the old floor of 8 ulps at
    max(|ref|, 1) (9.5e-7) and the bf16 test's no floor at all. A masking or head-mapping bug moves values
    by O(0.1), far above 8 ulps x 8 = 7.6e-6."""
    return 8 * torch.finfo(torch.float32).eps * max(ref.abs().max().item(), math.sqrt(ref.shape[-1]))


def assert_within_rule(ours, want, baseline, dtype, names=("out", "dq", "dk", "dv")):
    """flash-attn's rule: the error against float64 is at most 2x the baseline's, plus the rounding floor."""
    for name, got, ref, base in zip(names, ours, want, baseline):
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
        bound = 2 * max_err(base, ref) + rounding_floor(ref)
        assert max_err(got, ref) <= bound, error_report(name, got, ref, base, bound)
        assert torch.isfinite(got).all(), error_report(name, got, ref, base)


# ------------------------------------------------------------------------------------------- sdpa, flex


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("heads", HEADS, ids=[f"hq{hq}_hkv{hkv}" for hq, hkv in HEADS])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_sdpa_matches_reference_fp32_with_gradients(layout_name, heads, head_dim):
    # fp32: the floor of 8 ulps covers summation-order differences (SDPA's CPU kernel blocks the key
    # axis; the reference does one einsum), measured up to ~3x the baseline's own error at |ref| ~ 5.
    ours, want, baseline = check_against_reference(
        "sdpa", layout_name, LAYOUTS[layout_name], heads, head_dim, torch.float32, "cpu", backward=True
    )
    assert_within_rule(ours, want, baseline, torch.float32)


@pytest.mark.parametrize("heads", HEADS, ids=[f"hq{hq}_hkv{hkv}" for hq, hkv in HEADS])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_flex_forward_matches_reference_fp32_on_cpu(layout_name, heads):
    ours, want, baseline = check_against_reference(
        "flex", layout_name, LAYOUTS[layout_name], heads, 16, torch.float32, "cpu", backward=False
    )
    assert_within_rule(ours, want, baseline, torch.float32, names=("out",))


def plain_bf16_attention(q, k, v, cu_seqlens, groups):
    """Attention with every op in bf16 (scores, softmax, weighted sum): plain low-precision PyTorch."""
    mask = kernels.packed_attention_mask(cu_seqlens, groups, q.shape[0])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * q.shape[-1] ** -0.5  # [Hq, total, total] in bf16
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hij,jhd->ihd", probs, v)  # [total, Hq, Dh]


@pytest.mark.parametrize("impl", ["sdpa", pytest.param("flex", marks=needs_cuda)])
@pytest.mark.parametrize("layout_name", ["len113_image_middle", "mixed_batch"])
def test_bfloat16_error_within_twice_plain_bfloat16(impl, layout_name):
    device = "cuda" if CUDA else "cpu"
    cu_seqlens, groups, max_seqlen = build_layout(LAYOUTS[layout_name])
    cu_seqlens, groups = cu_seqlens.to(device), groups.to(device)
    inputs, grad_out = random_inputs(f"bf16-{impl}-{layout_name}", groups.numel(), (6, 2), 32, device)
    low = [x.bfloat16() for x in inputs]
    ours = run(impl, low, grad_out, cu_seqlens, max_seqlen, groups, torch.bfloat16)
    want = run("reference", low, grad_out, cu_seqlens, max_seqlen, groups, torch.float64)
    baseline_fn = lambda q, k, v: plain_bf16_attention(q, k, v, cu_seqlens, groups)
    leaves = [x.detach().requires_grad_(True) for x in low]
    out = baseline_fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    baseline = [out.detach()] + [leaf.grad for leaf in leaves]
    for name, got, ref, base in zip(("out", "dq", "dk", "dv"), ours, want, baseline):
        assert got.dtype == torch.bfloat16
        assert max_err(got, ref) <= 2 * max_err(base, ref), error_report(name, got, ref, base)


@needs_cuda
@pytest.mark.parametrize("heads", HEADS, ids=[f"hq{hq}_hkv{hkv}" for hq, hkv in HEADS])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_cuda_fp32_matches_reference_with_gradients(impl, layout_name, heads):
    ours, want, baseline = check_against_reference(
        impl, layout_name, LAYOUTS[layout_name], heads, 64, torch.float32, "cuda", backward=True
    )
    assert_within_rule(ours, want, baseline, torch.float32)


def test_flex_backward_on_cpu_raises_with_the_fix():
    cu_seqlens, groups, max_seqlen = build_layout(LAYOUTS["len113_image_middle"])
    (q, k, v), _ = random_inputs("flex-cpu-backward", groups.numel(), (4, 2), 16, "cpu")
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward pass on the CPU.*impl=sdpa"):
        packed_attention(q, k, v, cu_seqlens, max_seqlen, groups, impl="flex")
    with torch.no_grad():  # forward only is fine
        packed_attention(q, k, v, cu_seqlens, max_seqlen, groups, impl="flex")


def test_flex_mask_mod_is_the_contract():
    cu_seqlens, groups, _ = build_layout(LAYOUTS["mixed_batch"])
    total = groups.numel()
    mask_mod = packed_attention_mask_mod(cu_seqlens, groups, total)
    q_idx, kv_idx = torch.meshgrid(torch.arange(total), torch.arange(total), indexing="ij")
    got = mask_mod(0, 0, q_idx, kv_idx)
    assert torch.equal(got, kernels.packed_attention_mask(cu_seqlens, groups, total))
    text_only = packed_attention_mask_mod(cu_seqlens, None, total)(0, 0, q_idx, kv_idx)
    assert torch.equal(text_only, kernels.packed_attention_mask(cu_seqlens, None, total))


def test_flex_builds_the_block_mask_once_for_the_layers_of_a_batch(monkeypatch):
    from vlm_core.kernels import attention_torch

    built = []
    real = attention_torch.build_flex_block_mask
    monkeypatch.setattr(attention_torch, "build_flex_block_mask", lambda *a: built.append(a) or real(*a))
    attention_torch._last_block_mask.clear()
    cu_seqlens, groups, max_seqlen = build_layout(LAYOUTS["len113_image_middle"])
    (q, k, v), _ = random_inputs("flex-memo", groups.numel(), (4, 2), 16, "cpu")
    with torch.no_grad():
        outs = [attention_torch.packed_attention_flex(q, k, v, cu_seqlens, max_seqlen, groups) for _ in range(3)]
        assert len(built) == 1 and all(torch.equal(o, outs[0]) for o in outs)
        attention_torch.packed_attention_flex(q, k, v, cu_seqlens, max_seqlen, groups.clone())  # another batch
    assert len(built) == 2


@pytest.mark.parametrize("layout_name", ["len113_image_middle", "mixed_batch"])
def test_empty_segment_and_float64(layout_name):
    """An empty segment (repeated cu_seqlens entry) and float64 inputs: sdpa and flex agree with the
    reference to float64 rounding (1e-12: sums of a few hundred unit-scale float64 terms)."""
    cu_seqlens, groups, max_seqlen = build_layout(LAYOUTS[layout_name])
    cu_seqlens = torch.cat([cu_seqlens[:2], cu_seqlens[1:]])  # segment 1 is empty
    (q, k, v), _ = random_inputs(f"f64-{layout_name}", groups.numel(), (6, 3), 8, "cpu")
    q, k, v = q.double(), k.double(), v.double()
    want = packed_attention_reference(q, k, v, cu_seqlens, max_seqlen, groups)
    for impl in ("sdpa", "flex"):
        got = packed_attention(q, k, v, cu_seqlens, max_seqlen + 5, groups, impl=impl)
        assert max_err(got, want) < 1e-12, error_report(impl, got, want, want)


# -------------------------------------------------------------------------------- varlen, flash_attn


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@needs_cuda
@pytest.mark.parametrize("heads", HEADS, ids=[f"hq{hq}_hkv{hkv}" for hq, hkv in HEADS])
@pytest.mark.parametrize("layout_name", list(TEXT_LAYOUTS))
@pytest.mark.parametrize(
    "impl",
    ["varlen", pytest.param("flash_attn", marks=pytest.mark.skipif(not _flash_attn_importable(), reason="flash-attn not installed"))],
)
def test_causal_flash_kernels_match_reference_bf16(impl, layout_name, heads):
    cu_seqlens, groups, max_seqlen = build_layout(TEXT_LAYOUTS[layout_name])
    cu_seqlens, groups = cu_seqlens.cuda(), groups.cuda()
    inputs, grad_out = random_inputs(f"{impl}-{layout_name}-{heads}", groups.numel(), heads, 64, "cuda")
    low = [x.bfloat16() for x in inputs]
    for bidir in (None, groups):  # an all-zero bidir_group is a causal mask too
        ours = run(impl, low, grad_out, cu_seqlens, max_seqlen, bidir, torch.bfloat16)
        want = run("reference", low, grad_out, cu_seqlens, max_seqlen, bidir, torch.float64)
        leaves = [x.detach().requires_grad_(True) for x in low]
        out = plain_bf16_attention(*leaves, cu_seqlens, groups)
        out.backward(grad_out.to(out.dtype))
        baseline = [out.detach()] + [leaf.grad for leaf in leaves]
        for name, got, ref, base in zip(("out", "dq", "dk", "dv"), ours, want, baseline):
            bound = 2 * max_err(base, ref) + rounding_floor(ref)
            assert max_err(got, ref) <= bound, error_report(name, got, ref, base, bound)


# varlen_attn's keyword-only parameters in three releases' spelling (the positional ones are the same)
def _varlen_2_10(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, is_causal=False, scale=None): ...
def _varlen_window(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)): ...
def _varlen_2_13(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                 enable_gqa=False, seqused_k=None): ...
def _varlen_unknown(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, mask_kind="full"): ...


@pytest.mark.parametrize(
    ("varlen_attn", "gqa", "want"),
    [
        (_varlen_2_10, False, {"is_causal": True}),
        (_varlen_2_10, True, {"is_causal": True}),  # GQA by FlashAttention-2 itself
        (_varlen_window, True, {"window_size": (-1, 0)}),
        (_varlen_2_13, False, {"window_size": (-1, 0)}),
        (_varlen_2_13, True, {"window_size": (-1, 0), "enable_gqa": True}),
    ],
)
def test_varlen_keywords_follow_the_installed_signature(varlen_attn, gqa, want):
    assert varlen_causal_keywords(varlen_attn, gqa) == want


def test_varlen_keywords_refuse_a_signature_without_causality():
    with pytest.raises(RuntimeError, match="neither window_size nor is_causal.*mask_kind"):
        varlen_causal_keywords(_varlen_unknown, gqa=False)


def test_the_installed_varlen_attn_gets_keywords_it_takes():
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    assert set(varlen_causal_keywords(varlen.varlen_attn, gqa=True)) <= set(inspect.signature(varlen.varlen_attn).parameters)


@pytest.mark.parametrize("impl", ["varlen", "flash_attn"])
def test_causal_only_impls_reject_image_spans(impl):
    cu_seqlens, groups, max_seqlen = build_layout(LAYOUTS["len113_image_middle"])
    (q, k, v), _ = random_inputs("causal-only", groups.numel(), (4, 2), 16, "cpu")
    with pytest.raises(ValueError, match=f"impl={impl}: the batch has 16 image tokens.*use impl=triton"):
        packed_attention(q, k, v, cu_seqlens, max_seqlen, groups, impl=impl)


@pytest.mark.skipif(CUDA, reason="checks the error off CUDA")
@pytest.mark.parametrize("impl", ["varlen", "flash_attn"])
def test_causal_only_impls_need_cuda(impl):
    cu_seqlens, groups, max_seqlen = build_layout(TEXT_LAYOUTS["text_len113_203"])
    (q, k, v), _ = random_inputs("needs-cuda", groups.numel(), (4, 2), 16, "cpu")
    with pytest.raises(RuntimeError, match=f"impl={impl}: FlashAttention runs on CUDA only"):
        packed_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_seqlens, max_seqlen, groups, impl=impl)


# ----------------------------------------------------------------------------------- resolve_attn_impl


@pytest.fixture
def fake_triton(monkeypatch):
    """Replace the Triton kernel module by a stand-in whose triton_status() the test sets."""

    def install(ok: bool, reason: str = "", importable: bool = True):
        if not importable:
            monkeypatch.setattr(kernels, "_triton_module", lambda: (None, "vlm_core.kernels.packed_attention_triton cannot be imported (No module named 'triton')"))
            return
        def triton_status(device):
            if ok and torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                return False, "runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1"
            return ok, reason

        module = types.SimpleNamespace(triton_status=triton_status)
        monkeypatch.setattr(kernels, "_triton_module", lambda: (module, ""))

    return install


def records(caplog, level):
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "vlm_core.kernels"]


def test_auto_is_reference_on_cpu(caplog, fake_triton):
    fake_triton(ok=True)
    caplog.set_level(logging.INFO, logger="vlm_core.kernels")
    assert resolve_attn_impl("auto", "cpu") == "reference"
    assert not records(caplog, logging.WARNING)
    assert records(caplog, logging.INFO) == ["attention: attn_impl=auto -> reference on cpu (no fused kernel is used on cpu)"]


def test_auto_is_triton_on_cuda_when_it_can_run(caplog, fake_triton, monkeypatch):
    fake_triton(ok=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    caplog.set_level(logging.INFO, logger="vlm_core.kernels")
    assert resolve_attn_impl("auto", torch.device("cuda")) == "triton"  # resolution needs no GPU
    assert "auto -> triton on cuda" in records(caplog, logging.INFO)[0]


def test_auto_does_not_train_with_the_interpreter_on_cuda(caplog, fake_triton, monkeypatch):
    fake_triton(ok=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    caplog.set_level(logging.INFO, logger="vlm_core.kernels")
    assert resolve_attn_impl("auto", "cuda") == "sdpa"
    assert "TRITON_INTERPRET=1" in records(caplog, logging.INFO)[0]


@pytest.mark.parametrize("importable", [True, False])
def test_auto_is_sdpa_on_cuda_without_triton(caplog, fake_triton, monkeypatch, importable):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fake_triton(ok=False, reason="triton is not installed", importable=importable)
    caplog.set_level(logging.INFO, logger="vlm_core.kernels")
    assert resolve_attn_impl("auto", "cuda") == "sdpa"
    (message,) = records(caplog, logging.INFO)
    assert "auto -> sdpa on cuda (not triton:" in message
    assert ("triton is not installed" if importable else "cannot be imported") in message


@pytest.mark.parametrize(
    "requested, device, kwargs, setup, chosen, reason",
    [
        ("triton", "cpu", {}, {"ok": True}, "reference", "TRITON_INTERPRET=1"),
        ("triton", "cpu", {}, {"ok": False, "importable": False}, "reference", "cannot be imported"),
        ("triton", "cuda", {}, {"ok": False, "reason": "triton 2.1 is too old"}, "sdpa", "triton 2.1 is too old"),
        ("varlen", "cpu", {"needs_bidir": False}, None, "reference", "runs on CUDA only"),
        ("varlen", "cuda", {"needs_bidir": True}, None, "sdpa", "causal-only"),
        ("flash_attn", "cuda", {"needs_bidir": True}, None, "sdpa", "causal-only"),
        ("flex", "cpu", {"needs_backward": True}, None, "reference", "no backward pass on the CPU"),
    ],
)
def test_explicit_impl_that_cannot_run_falls_back_with_a_warning(
    caplog, fake_triton, monkeypatch, requested, device, kwargs, setup, chosen, reason
):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fake_triton(**(setup or {"ok": True}))
    caplog.set_level(logging.INFO, logger="vlm_core.kernels")
    assert resolve_attn_impl(requested, device, **kwargs) == chosen
    (warning,) = records(caplog, logging.WARNING)
    assert f"attn_impl={requested} cannot run on {device}" in warning
    assert f"falling back to attn_impl={chosen}" in warning
    assert reason in warning
    assert records(caplog, logging.INFO) == [f"attention: attn_impl={chosen} on {device} (requested {requested})"]


def test_flash_attn_missing_falls_back(caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    caplog.set_level(logging.INFO, logger="vlm_core.kernels")
    assert resolve_attn_impl("flash_attn", "cuda", needs_bidir=False) == "sdpa"
    (warning,) = records(caplog, logging.WARNING)
    assert "flash-attn package is not importable" in warning


@pytest.mark.parametrize(
    "requested, device, kwargs",
    [
        ("reference", "cpu", {}),
        ("sdpa", "cpu", {}),
        ("sdpa", "cuda", {}),
        ("flex", "cpu", {"needs_backward": False}),
        ("flex", "cuda", {}),
        ("varlen", "cuda", {"needs_bidir": False}),
        ("triton", "cuda", {}),
    ],
)
def test_explicit_impl_that_can_run_is_kept(caplog, fake_triton, monkeypatch, requested, device, kwargs):
    fake_triton(ok=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    caplog.set_level(logging.INFO, logger="vlm_core.kernels")
    assert resolve_attn_impl(requested, device, **kwargs) == requested
    assert not records(caplog, logging.WARNING)


def test_triton_on_cpu_under_the_interpreter_is_kept(fake_triton, monkeypatch):
    fake_triton(ok=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attn_impl_status("triton", "cpu") == (True, "")


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="unknown attn_impl='magic'; expected 'auto' or one of"):
        resolve_attn_impl("magic", "cpu")
    with pytest.raises(ValueError, match="unknown impl='auto'"):
        packed_attention(*[torch.randn(3, 2, 4)] * 3, torch.tensor([0, 3], dtype=torch.int32), 3, impl="auto")
