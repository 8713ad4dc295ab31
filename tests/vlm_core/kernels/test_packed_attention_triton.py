"""packed_attention_triton against the reference: forward and dq/dk/dv, windows, limits.

Without CUDA the kernels run in Triton's interpreter at small sizes, so CI exercises them; the
large bf16/fp16 cases need a GPU and are skipped otherwise. The interpreter needs
TRITON_INTERPRET=1 twice: when triton is first imported (it decorates its own library, tl.max,
tl.sum, ..., then) and when the kernels run. conftest.py imports triton under that setting if
nothing has imported it yet, and a fixture sets it around each kernel test; neither leaves it
set for other tests. If triton was imported earlier without it, the kernel tests skip and say so.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from kernel_checks import (
    CUDA,
    DEVICE,
    HAS_TRITON,
    dense_attention,
    error_report,
    generator,
    layout_tensors,
    max_err,
    requires_cuda,
    run_with_grads,
)

from vlm_core.kernels import (
    ATTENTION_IMPLS,
    packed_attention,
    packed_attention_mask,
    packed_attention_reference,
)
from vlm_core.kernels.packed_attention_triton import (
    packed_attention_triton,
    packed_attention_windows,
    triton_status,
)

# A layout is a list of samples; a sample is a list of spans ("t", n) text or ("i", n) image.
CPU_LAYOUTS = {
    "len1": [[("t", 1)]],
    "len113_image_middle": [[("t", 40), ("i", 16), ("t", 57)]],
    "len203_images_start_middle_end": [
        [("i", 24), ("t", 60), ("i", 32), ("t", 63), ("i", 24)]
    ],
    "mixed_batch": [
        [("t", 1)],
        [("i", 48)],  # a sample that is all image
        [("t", 10), ("i", 20), ("t", 5), ("i", 12), ("t", 2)],
        [("i", 30), ("t", 3)],
        [("t", 19)],
    ],
    "adjacent_images": [[("t", 3), ("i", 20), ("i", 20), ("t", 30)], [("t", 40)]],
    "text_only": [
        [("t", 1)],
        [("t", 113)],
        [("t", 37)],
        [("t", 90)],
    ],  # bidir_group None
}

# (layout, (Hq, Hkv), Dh, dtype, softmax_scale). The interpreter costs ~1-4 s per case on two
# cores, so the cases cover each axis (GQA 1/2/4/8, padded Dh 24, scale, dtype) rather than
# the full product.
CPU_CASES = [
    ("len1", (2, 2), 32, torch.float32, None),
    ("len113_image_middle", (4, 2), 32, torch.float32, None),
    ("len203_images_start_middle_end", (4, 1), 64, torch.float32, 0.3),
    ("mixed_batch", (4, 4), 32, torch.float32, None),
    ("mixed_batch", (8, 1), 24, torch.float32, None),
    ("adjacent_images", (4, 2), 16, torch.float32, None),
    ("text_only", (4, 2), 32, torch.float32, 0.3),
    ("len113_image_middle", (4, 2), 32, torch.bfloat16, None),
    ("mixed_batch", (4, 1), 64, torch.bfloat16, 0.2),
    ("text_only", (2, 2), 16, torch.bfloat16, None),
    ("len203_images_start_middle_end", (2, 1), 32, torch.float16, None),
]


def build_layout(layout, device="cpu"):
    """cu_seqlens [n+1] int32 and bidir_group [total] int32 (one fresh id per image)."""
    cu_seqlens, groups, _ = layout_tensors(layout, device)
    return cu_seqlens, groups


def random_inputs(total, heads, head_dim, dtype, seed_text, device):
    num_q_heads, num_kv_heads = heads
    seeded = generator(seed_text)
    shapes = [
        (total, num_q_heads, head_dim),
        (total, num_kv_heads, head_dim),
        (total, num_kv_heads, head_dim),
        (total, num_q_heads, head_dim),  # grad_out, shared by every implementation
    ]
    return [
        torch.randn(shape, generator=seeded).to(device=device, dtype=dtype)
        for shape in shapes
    ]


def check_against_reference(
    layout, heads, head_dim, dtype, softmax_scale, use_bidir, device, seed_text, dq_mode=None
):
    """Kernel vs reference (float64 on its inputs), judged by plain attention in dtype."""
    cu_seqlens, groups = build_layout(layout, device)
    bidir_group = groups if use_bidir else None
    total = groups.numel()
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    q, k, v, grad_out = random_inputs(total, heads, head_dim, dtype, seed_text, device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    mask = packed_attention_mask(cu_seqlens, bidir_group, total)

    ours = run_with_grads(
        lambda q_, k_, v_: packed_attention_triton(
            q_, k_, v_, cu_seqlens, max_seqlen, bidir_group, softmax_scale, dq_mode
        ),
        (q, k, v),
        grad_out,
    )
    want = run_with_grads(
        lambda q_, k_, v_: packed_attention_reference(
            q_, k_, v_, cu_seqlens, max_seqlen, bidir_group, softmax_scale
        ),
        [x.double() for x in (q, k, v)],
        grad_out.double(),
    )
    baseline = run_with_grads(
        lambda q_, k_, v_: dense_attention(q_, k_, v_, mask, scale), (q, k, v), grad_out
    )
    errors = {}
    for name, got, ref, base in zip(("out", "dq", "dk", "dv"), ours, want, baseline):
        assert got.dtype == dtype, f"{name} dtype {got.dtype}, expected {dtype}"
        # flash-attn's rule: at most 2x the error of plain PyTorch in the same dtype against
        # the float64 reference. For float32 add a floor of 8 ulps of max(|ref|, 1): kernel and
        # baseline are both at rounding level (~1e-6) with different summation orders, so the
        # baseline is sometimes luckier by ~3x, or exact where terms of size ~1 cancel (dq of a
        # length-1 sample is exactly 0; the kernel gets dO.V - dO.O ~ 2e-7). A masking or
        # head-mapping bug moves values by O(0.1), far above either term. Half precision needs
        # no floor: the baseline rounds scores and probabilities to 8-11 bits and errs ~1e-2.
        floor = (
            8 * torch.finfo(torch.float32).eps * max(ref.abs().max().item(), 1.0)
            if dtype == torch.float32
            else 0.0
        )
        bound = 2 * max_err(base, ref) + floor
        report = error_report(name, got, ref, base, bound)
        assert torch.isfinite(got).all(), report
        assert max_err(got, ref) <= bound, report
        errors[name] = max_err(got, ref)
    return errors


# Every case with the default (separate) dQ kernel; the atomic dQ on the cases that cross the most
# tile and segment edges: GQA 2, 4 and 8, a padded head dim, a custom scale, each dtype, text only.
MODE_CASES = [(*case, "separate") for case in CPU_CASES] + [
    (*CPU_CASES[i], "atomic") for i in (2, 4, 6, 8, 10)
]


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(
    ("layout_name", "heads", "head_dim", "dtype", "softmax_scale", "dq_mode"),
    MODE_CASES,
    ids=[
        f"{name}-hq{h[0]}_hkv{h[1]}-d{d}-{str(dt)[6:]}-scale{s}" + ("-atomic_dq" if m == "atomic" else "")
        for name, h, d, dt, s, m in MODE_CASES
    ],
)
def test_matches_reference(layout_name, heads, head_dim, dtype, softmax_scale, dq_mode):
    check_against_reference(
        CPU_LAYOUTS[layout_name],
        heads,
        head_dim,
        dtype,
        softmax_scale,
        use_bidir=layout_name != "text_only",
        device=DEVICE,
        seed_text=f"{layout_name}-{heads}-{head_dim}-{dtype}",
        dq_mode=dq_mode,
    )


@pytest.mark.usefixtures("triton_kernels")
def test_atomic_dq_launches_no_dq_kernel(monkeypatch):
    """The atomic mode gets dq from the dK/dV kernel alone: the dq kernel is never launched."""
    from vlm_core.kernels import packed_attention_triton as pat
    from vlm_core.kernels.triton_runtime import interpreting

    kernels = pat._kernels(interpreting())

    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("the dq kernel was launched")

    monkeypatch.setattr(kernels, "dq", Forbidden())
    inputs = _tiny_inputs(torch.float32, 16)
    q = inputs["q"].clone().requires_grad_()
    packed_attention_triton(**{**inputs, "q": q}, dq_mode="atomic").sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    with pytest.raises(AssertionError, match="dq kernel was launched"):
        packed_attention_triton(**{**inputs, "q": q}, dq_mode="separate").sum().backward()


@pytest.mark.usefixtures("triton_kernels")
def test_dq_mode_from_the_environment(monkeypatch):
    """VLM_ATTN_DQ picks the mode when the call does not; an unknown mode is a ValueError."""
    inputs = _tiny_inputs(torch.float32, 16)
    q = inputs["q"].clone().requires_grad_()

    def dq(**kwargs):
        q.grad = None
        packed_attention_triton(**{**inputs, "q": q}, **kwargs).sum().backward()
        return q.grad.clone()

    separate = dq(dq_mode="separate")
    monkeypatch.setenv("VLM_ATTN_DQ", "atomic")
    torch.testing.assert_close(dq(), separate, rtol=0, atol=1e-6)  # the same dq, summed in another order
    monkeypatch.setenv("VLM_ATTN_DQ", "fast")
    with pytest.raises(ValueError, match="VLM_ATTN_DQ"):
        dq()


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
@pytest.mark.parametrize("poisoned", [0, 1])
# The interpreter's numpy max over the poisoned sample's all-NaN rows warns; that sample's
# results are not checked.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_other_segment_is_never_read(poisoned, dq_mode):
    """NaN in one sample's q, k, v and grad_out leaves the other sample's results exact.

    Each sample is 128 tokens, a multiple of every tile size, so a tile that visited the other
    sample's keys (forward, dQ) or queries (dK, dV) would turn 0 * NaN into NaN.
    """
    layout = [[("t", 20), ("i", 40), ("t", 68)], [("i", 64), ("t", 64)]]
    cu_seqlens, groups = build_layout(layout, DEVICE)
    q, k, v, grad_out = random_inputs(256, (4, 2), 16, torch.float32, "poison", DEVICE)
    bad = slice(128 * poisoned, 128 * poisoned + 128)
    good = slice(128 * (1 - poisoned), 128 * (1 - poisoned) + 128)
    for tensor in (q, k, v, grad_out):
        tensor[bad] = float("nan")
    ours = run_with_grads(
        lambda q_, k_, v_: packed_attention_triton(q_, k_, v_, cu_seqlens, 128, groups, dq_mode=dq_mode),
        (q, k, v),
        grad_out,
    )
    good_cu = torch.tensor([0, 128], dtype=torch.int32, device=DEVICE)
    want = run_with_grads(
        lambda q_, k_, v_: packed_attention_reference(
            q_, k_, v_, good_cu, 128, groups[good]
        ),
        [x[good].double() for x in (q, k, v)],
        grad_out[good].double(),
    )
    for name, got, ref in zip(("out", "dq", "dk", "dv"), ours, want):
        got = got[good]
        assert torch.isfinite(got).all(), f"{name}: {torch.isnan(got).sum()} NaN"
        # 1e-5: float32 attention over <= 128 unit-scale keys; measured errors ~1e-6.
        assert max_err(got, ref) < 1e-5, f"{name}: max err {max_err(got, ref):.3e}"


# ~6k tokens: lengths 1023, 1, 113, 203, three 576-token images in one sample, an all-image
# sample (576 tokens, the size of a 24x24 patch grid), and a long text tail.
GPU_LAYOUT = [
    [("t", 100), ("i", 576), ("t", 347)],
    [("t", 1)],
    [("t", 113)],
    [("i", 576), ("t", 30), ("i", 576), ("t", 20), ("i", 576), ("t", 100)],
    [("i", 576)],
    [("t", 203)],
    [("t", 50), ("i", 576), ("t", 1500)],
]
GPU_CASES = [
    ((8, 2), 64, torch.bfloat16, None, True),
    ((8, 2), 64, torch.float16, None, True),
    ((6, 6), 96, torch.bfloat16, 0.1, True),
    ((6, 3), 96, torch.float16, None, True),
    ((8, 1), 128, torch.bfloat16, None, True),
    ((16, 4), 128, torch.float16, None, True),
    ((8, 2), 128, torch.bfloat16, None, False),  # bidir_group None
]


@requires_cuda
@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(
    ("heads", "head_dim", "dtype", "softmax_scale", "use_bidir"),
    GPU_CASES,
    ids=[
        f"hq{h[0]}_hkv{h[1]}-d{d}-{str(dt)[6:]}-scale{s}-{'bidir' if b else 'text'}"
        for h, d, dt, s, b in GPU_CASES
    ],
)
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
def test_matches_reference_gpu_sizes(heads, head_dim, dtype, softmax_scale, use_bidir, dq_mode):
    check_against_reference(
        GPU_LAYOUT,
        heads,
        head_dim,
        dtype,
        softmax_scale,
        use_bidir=use_bidir,
        device="cuda",
        seed_text=f"gpu-{heads}-{head_dim}-{dtype}-{use_bidir}",
        dq_mode=dq_mode,
    )


def random_layout(generator):
    """Random segments (some empty or of length 1) of text and image spans, ids reused."""
    cu, groups = [0], []
    next_id = 1
    for _ in range(int(torch.randint(1, 6, (1,), generator=generator))):
        length = int(torch.randint(0, 40, (1,), generator=generator))
        position = 0
        while position < length:
            span = min(
                int(torch.randint(1, 12, (1,), generator=generator)), length - position
            )
            kind = int(torch.randint(0, 3, (1,), generator=generator))
            if kind == 0:
                groups += [0] * span
            else:
                # kind 2 reuses id 1 in every segment: equal ids in different samples are
                # different images. Within a sample an id is used for one span only.
                if kind == 2 and 1 not in groups[cu[-1] :]:
                    image_id = 1
                else:
                    next_id += 1
                    image_id = next_id
                groups += [image_id] * span
            position += span
        cu.append(len(groups))
    if not groups:  # at least one token
        cu, groups = [0, 1], [0]
    return (
        torch.tensor(cu, dtype=torch.int32),
        torch.tensor(groups, dtype=torch.int32),
    )


def test_windows_equal_the_reference_mask_on_random_layouts():
    generator = torch.Generator().manual_seed(2024)
    for trial in range(200):
        cu_seqlens, groups = random_layout(generator)
        total = groups.numel()
        for bidir_group in (groups, None):
            mask = packed_attention_mask(cu_seqlens, bidir_group, total)
            windows = packed_attention_windows(cu_seqlens, bidir_group, total)
            i = torch.arange(total)[:, None]  # query
            j = torch.arange(total)[None, :]  # key
            by_query = (windows.seg_start[:, None] <= j) & (j < windows.kv_end[:, None])
            by_key = (windows.q_start[None, :] <= i) & (i < windows.seg_end[None, :])
            where = f"trial {trial}: cu_seqlens {cu_seqlens.tolist()}, groups {groups.tolist()}"
            assert torch.equal(by_query, mask), where
            assert torch.equal(by_key, mask), where
            assert all(w.dtype == torch.int32 for w in windows), where


def test_windows_on_a_hand_written_case():
    # Sample 0: text, text, image(2), text. Sample 1 (after an empty one): image(2), text.
    cu_seqlens = torch.tensor([0, 5, 5, 8], dtype=torch.int32)
    groups = torch.tensor([0, 0, 1, 1, 0, 1, 1, 0], dtype=torch.int32)
    windows = packed_attention_windows(cu_seqlens, groups, 8)
    assert windows.seg_start.tolist() == [0, 0, 0, 0, 0, 5, 5, 5]
    assert windows.kv_end.tolist() == [1, 2, 4, 4, 5, 7, 7, 8]
    assert windows.q_start.tolist() == [0, 1, 2, 2, 4, 5, 5, 7]
    assert windows.seg_end.tolist() == [5, 5, 5, 5, 5, 8, 8, 8]
    # One id on both sides of a segment boundary: two images, split at the boundary.
    cu_seqlens = torch.tensor([0, 3, 6], dtype=torch.int32)
    groups = torch.tensor([0, 5, 5, 5, 5, 0], dtype=torch.int32)
    windows = packed_attention_windows(cu_seqlens, groups, 6)
    assert windows.kv_end.tolist() == [1, 3, 3, 5, 5, 6]
    assert windows.q_start.tolist() == [0, 1, 1, 3, 3, 5]


def test_image_id_split_inside_a_sample_is_rejected():
    cu_seqlens = torch.tensor([0, 9], dtype=torch.int32)
    groups = torch.tensor([0, 3, 3, 0, 0, 3, 3, 0, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous span"):
        packed_attention_windows(cu_seqlens, groups, 9)


def _tiny_inputs(dtype=torch.float32, head_dim=16, device=DEVICE):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(6, 4, head_dim, generator=generator)
    k = torch.randn(6, 2, head_dim, generator=generator)
    v = torch.randn(6, 2, head_dim, generator=generator)
    return {
        "q": q.to(device=device, dtype=dtype),
        "k": k.to(device=device, dtype=dtype),
        "v": v.to(device=device, dtype=dtype),
        "cu_seqlens": torch.tensor([0, 2, 6], dtype=torch.int32, device=device),
        "max_seqlen": 4,
        "bidir_group": torch.tensor(
            [0, 0, 1, 1, 0, 0], dtype=torch.int32, device=device
        ),
    }


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(
    ("dtype", "head_dim", "message"),
    [
        (torch.float64, 16, "float64"),
        (torch.float32, 8, "head_dim=8"),
        (torch.float32, 20, "head_dim=20"),
        (torch.float32, 256, "head_dim=256"),
    ],
)
def test_unsupported_inputs_raise_value_error(dtype, head_dim, message):
    with pytest.raises(ValueError, match=message):
        packed_attention_triton(**_tiny_inputs(dtype, head_dim))


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("scale", [0.0, -0.125, float("nan")])
def test_softmax_scale_must_be_positive(scale):
    """The forward scales each row's maximum instead of every score, which needs a positive scale."""
    with pytest.raises(ValueError, match="softmax_scale"):
        packed_attention_triton(**_tiny_inputs(torch.float32, 16), softmax_scale=scale)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = triton_status("cpu")
    assert not ok
    assert "TRITON_INTERPRET=1" in reason
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        packed_attention_triton(**_tiny_inputs(device="cpu"))


@pytest.mark.skipif(CUDA, reason="checks the CPU-only setup")
@pytest.mark.usefixtures("triton_kernels")
def test_status_reports_the_interpreter_on_cpu():
    ok, reason = triton_status("cpu")
    assert ok, reason
    assert "interpreter" in reason


def test_module_imports_and_reports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from vlm_core.kernels.packed_attention_triton import triton_status\n"
        "print(triton_status())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "(False, 'triton is not importable" in result.stdout, result.stdout


@pytest.mark.skipif("triton" not in ATTENTION_IMPLS, reason="dispatcher has no triton")
@pytest.mark.usefixtures("triton_kernels")
def test_dispatcher_runs_the_kernel():
    inputs = _tiny_inputs()
    got = packed_attention(**inputs, impl="triton")
    want = packed_attention_triton(**inputs)
    assert torch.equal(got, want)


@pytest.mark.usefixtures("triton_kernels")
def test_the_layers_of_a_batch_read_cu_seqlens_and_build_windows_once(monkeypatch):
    """A model's layers pass the same cu_seqlens and bidir_group: one host read of cu_seqlens and one
    windows build (with its sync) for the batch, not per layer; a new batch builds again, and the
    output and gradients of every call are the ones the kernel computes from fresh windows."""
    from vlm_core import kernels
    from vlm_core.kernels import packed_attention_triton as module

    checks, builds = [], []
    real_check, real_windows = kernels._check_cu_seqlens_values, module.packed_attention_windows
    monkeypatch.setattr(kernels, "_check_cu_seqlens_values", lambda *a: checks.append(1) or real_check(*a))
    monkeypatch.setattr(module, "packed_attention_windows", lambda *a: builds.append(1) or real_windows(*a))
    kernels._checked_cu_seqlens.clear()
    module._last_windows.clear()
    cu_seqlens, groups = build_layout(CPU_LAYOUTS["mixed_batch"], DEVICE)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    q, k, v, grad_out = random_inputs(groups.numel(), (4, 2), 16, torch.float32, "memo", DEVICE)
    layers = []
    for _ in range(3):  # three layers of one forward pass
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        out = packed_attention(*leaves, cu_seqlens, max_seqlen, groups, impl="triton")
        out.backward(grad_out)
        layers.append([out.detach()] + [leaf.grad for leaf in leaves])
    assert len(checks) == 1 and len(builds) == 1
    fresh = [x.detach().requires_grad_(True) for x in (q, k, v)]
    module._last_windows.clear()
    fresh_out = packed_attention_triton(*fresh, cu_seqlens, max_seqlen, groups)
    fresh_out.backward(grad_out)
    for layer in layers:
        assert all(torch.equal(a, b) for a, b in zip(layer, [fresh_out.detach()] + [x.grad for x in fresh]))
    assert len(builds) == 2  # the fresh run's
    packed_attention(q, k, v, cu_seqlens, max_seqlen, groups.clone(), impl="triton")  # the next batch
    assert len(checks) == 1 and len(builds) == 3  # cu_seqlens unchanged: its check still holds
