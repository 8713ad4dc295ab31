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


NAMES = ("embeds", "features", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "norm_weight", "norm_bias")


def make_inputs(total, rows, dims, dtype, device, name, bias=True, norm=None):
    """({argument name: tensor or None}, grad_out, rows); norm: None, "affine" or "weight" (no bias)."""
    g = generator(name)
    dim_v, dim_h, dim = dims
    tensors = {
        "embeds": torch.randn(total, dim, generator=g),
        # off-centre, unequal rows: the LayerNorm's statistics matter
        "features": torch.randn(len(rows), dim_v, generator=g) * (1 + torch.rand(len(rows), 1, generator=g)) + 0.5,
        "fc1_weight": torch.randn(dim_h, dim_v, generator=g) / dim_v**0.5,
        "fc1_bias": 0.1 * torch.randn(dim_h, generator=g),
        "fc2_weight": torch.randn(dim, dim_h, generator=g) / dim_h**0.5,
        "fc2_bias": 0.1 * torch.randn(dim, generator=g),
        "norm_weight": 1 + 0.5 * torch.randn(dim_v, generator=g),
        "norm_bias": 0.1 * torch.randn(dim_v, generator=g),
    }
    grad_out = torch.randn(total, dim, generator=g).to(device=device, dtype=dtype)
    if not bias:
        tensors["fc1_bias"] = tensors["fc2_bias"] = None
    if norm is None:
        tensors["norm_weight"] = None
    if norm != "affine":
        tensors["norm_bias"] = None
    tensors = {key: None if t is None else t.to(device=device, dtype=dtype) for key, t in tensors.items()}
    return tensors, grad_out, torch.tensor(rows, dtype=torch.int64, device=device)


def check(total, rows, dims, dtype, device, name, bias=True, norm=None, frozen=()):
    """Output and every gradient of the fused op against the float64 reference (STYLE.md's rule); the
    arguments named in ``frozen`` do not require grad."""
    tensors, grad_out, index = make_inputs(total, rows, dims, dtype, device, name, bias, norm)
    present = [key for key in NAMES if tensors[key] is not None]

    def call(fn):
        def run(*leaves):
            args = dict(zip(present, leaves))
            args["embeds"] = args["embeds"] * 1  # a non-leaf: the kernel writes it in place
            ordered = [args.get(key) for key in NAMES]
            return fn(ordered[0], ordered[1], index, *ordered[2:])

        return run

    def grads(fn, cast=None):
        inputs = [tensors[key] for key in present]
        return run_with_grads(call(fn), inputs, grad_out, cast, trainable=[key not in frozen for key in present])

    ours = grads(projector_scatter_triton)
    exact = grads(projector_scatter_reference, cast=torch.float64)
    baseline = grads(projector_scatter_reference)
    labels = ["out"] + ["d" + key for key in present if key not in frozen]
    errors = {}
    for label, got, want, base in zip(labels, ours, exact, baseline, strict=True):
        assert got.dtype == dtype, f"{label}: {got.dtype}"
        errors[label] = check_close(label, got, want, base, dtype)
    if "embeds" not in frozen:
        assert torch.equal(ours[1][index], torch.zeros_like(ours[1][index])), "overwritten rows got a gradient"
    return errors


# (total, image rows, (D_v, D_h, D), dtype, biases, LayerNorm): one image token; rows at the start, middle
# and end of the buffer and back to back (two images); widths that are not multiples of the tiles.
CPU_CASES = [
    (5, [2], (16, 24, 8), torch.float32, True, None),
    (40, [0, 1, 2, 3, 17, 18, 19, 20, 36, 37, 38, 39], (24, 40, 36), torch.float32, True, None),
    (40, list(range(4, 22)), (24, 40, 36), torch.float32, False, None),
    (40, [0, 1, 2, 3, 17, 18, 19, 20, 36, 37, 38, 39], (24, 40, 36), torch.bfloat16, True, None),
    (33, list(range(5, 23)), (32, 48, 20), torch.float16, True, None),
    (5, [2], (16, 24, 8), torch.float32, True, "affine"),
    (40, [0, 1, 2, 3, 17, 18, 19, 20, 36, 37, 38, 39], (24, 40, 36), torch.float32, True, "affine"),
    (40, list(range(4, 22)), (40, 24, 36), torch.float32, False, "weight"),
    (40, [0, 1, 2, 3, 17, 18, 19, 20, 36, 37, 38, 39], (24, 40, 36), torch.bfloat16, True, "affine"),
    (33, list(range(5, 23)), (32, 48, 20), torch.float16, True, "affine"),
    # 200 image rows: 13 row tiles of d pre's column sums, the bias gradients' row splits
    (260, list(range(30, 230)), (16, 24, 8), torch.float32, True, None),
]


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("total", "rows", "dims", "dtype", "bias", "norm"), CPU_CASES,
                         ids=[f"total{c[0]}-m{len(c[1])}-{c[2]}-{str(c[3])[6:]}-bias{c[4]}-norm{c[5]}"
                              for c in CPU_CASES])  # fmt: skip
def test_matches_reference(total, rows, dims, dtype, bias, norm):
    name = f"proj-{total}-{len(rows)}-{dims}-{dtype}-{bias}" + (f"-{norm}" if norm else "")
    check(total, rows, dims, dtype, DEVICE, name, bias, norm)


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("frozen", [("features",), ("norm_weight", "norm_bias"), ("embeds", "features", "fc1_weight"),
                                    ("fc2_weight",),
                                    ("features", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias")])  # fmt: skip
def test_gradients_with_frozen_inputs(frozen):
    """A frozen tower (no d features) still trains the norm; a frozen norm still passes d features; a frozen
    fc1 or fc2 weight (its GEMM skipped) leaves the trained bias's gradient right. With everything before fc2
    frozen, no d pre is computed, so d W2 recomputes GELU in its loads instead of reading it from d pre's
    epilogue."""
    rows = [1, 2, 3, 6, 7, 8, 9]
    check(12, rows, (24, 40, 36), torch.float32, DEVICE, f"proj-frozen-{frozen}", norm="affine", frozen=frozen)


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("slice_width", [32, 16, 8])
def test_gelu_epilogues_in_column_slices(monkeypatch, slice_width):
    """The GELU epilogues (forward GEMM 1; d pre with d b1's column sums and gelu(pre) for d W2) on the
    interpreter's whole 32-column tile, in halves and in quarters: each matches the reference. D_h = 44 ends
    in the middle of the second tile's second slice, so slices are partly and wholly out of range."""
    from vlm_core.kernels import fused_projector_kernels as kernels

    monkeypatch.setattr(kernels, "_INTERPRETER_EPILOGUE_SLICE", slice_width)
    kernels._kernels.cache_clear()  # the interpreter's config is built with the kernels
    try:
        rows = [0, 1, 2, 3, 17, 18, 19, 20, 36, 37, 38, 39]
        check(40, rows, (24, 44, 36), torch.float32, DEVICE, f"proj-slices-{slice_width}", norm="affine")
    finally:
        monkeypatch.undo()
        kernels._kernels.cache_clear()


@requires_cuda
@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [None, "affine"])
def test_matches_reference_gpu_sizes(dtype, norm):
    """LLaVA-1.5 widths: 4 images of 576 tokens in a 3,000-token buffer, D_v 1024, D_h = D = 4096 (and with
    InternVL's LayerNorm in front)."""
    rows = [r for start in (10, 700, 1300, 2400) for r in range(start, start + 576)]
    check(3000, rows, (1024, 4096, 4096), dtype, "cuda", f"proj-gpu-{dtype}-{norm}", norm=norm)


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("layer_norm", [False, True])
def test_fused_module_keeps_the_projector_state_dict_and_output(layer_norm):
    torch.manual_seed(0)
    plain = Projector(24, 40, 36, layer_norm=layer_norm)
    if layer_norm:
        plain.norm.weight.data.normal_()
        plain.norm.bias.data.normal_()
    fused = FusedProjector(24, 40, 36, layer_norm=layer_norm)
    fused.load_state_dict(plain.state_dict())
    plain.load_state_dict(fused.state_dict())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert ("norm.weight" in plain.state_dict()) == layer_norm
    assert fusable_projector_problem(plain) == ""
    features = torch.randn(3, 4, 24) + 1
    torch.testing.assert_close(fused.to(DEVICE)(features.to(DEVICE)).cpu(), plain(features), rtol=0, atol=4e-6)
    embeds, rows = torch.randn(20, 36), torch.tensor([0, 1, 2, 3, 7, 8, 9, 10, 16, 17, 18, 19])
    want = embeds.masked_scatter(torch.isin(torch.arange(20), rows)[:, None], plain(features).reshape(12, 36))
    got = fused(features.to(DEVICE), embeds.to(DEVICE), rows.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=4e-6)


@pytest.mark.usefixtures("triton_kernels")
def test_layer_norm_under_autocast():
    """float32 features and parameters, bf16 autocast: the output and every gradient against the float64
    truth, with the reference under autocast (F.layer_norm in float32, the GEMMs in bf16) as the baseline."""
    tensors, grad_out, rows = make_inputs(12, [1, 2, 3, 6, 7, 8, 9], (24, 40, 36), torch.float32, DEVICE, "autocast",
                                          norm="affine")  # fmt: skip
    names = [key for key in NAMES if tensors[key] is not None]

    def run(fn, cast=None, autocast=True):
        def call(*leaves):
            args = dict(zip(names, leaves))
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
                return fn(args["embeds"] * 1, args["features"], rows, *(args[key] for key in NAMES[2:]))

        results = run_with_grads(call, [tensors[key] for key in names], grad_out, cast)
        assert results[0].dtype == (cast or torch.float32)  # stored into the float32 buffer
        return results

    ours = run(projector_scatter_triton)
    baseline = run(projector_scatter_reference)
    exact = run(projector_scatter_reference, cast=torch.float64, autocast=False)
    for label, got, want, base in zip(["out"] + names, ours, exact, baseline, strict=True):
        assert got.dtype == torch.float32, label
        check_close(f"autocast {label}", got, want, base, torch.bfloat16)


def test_a_projector_that_is_not_two_linears_is_not_fused():
    class Sharded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Identity()
            self.fc2 = torch.nn.Linear(2, 2)

    assert "not a plain nn.Linear" in fusable_projector_problem(Sharded())
    unaffine = Projector(4, 4, 4)
    unaffine.norm = torch.nn.LayerNorm(4, elementwise_affine=False)
    assert "not a plain nn.LayerNorm" in fusable_projector_problem(unaffine)
    assert fusable_projector_problem(Projector(4, 4, 4, layer_norm=True)) == ""
    assert torch.equal(projector_reference(torch.ones(1, 2), torch.eye(2), None, torch.eye(2), None),
                       torch.nn.functional.gelu(torch.ones(1, 2)))  # fmt: skip


@pytest.mark.usefixtures("triton_kernels")
def test_limits_raise_value_error():
    tensors, _, rows = make_inputs(8, [1, 2], (8, 16, 4), torch.float32, DEVICE, "lim", norm="affine")
    embeds, features, w1, b1, w2, b2, norm_w, norm_b = (tensors[key] for key in NAMES)
    with pytest.raises(ValueError, match="do not chain"):
        projector_scatter_triton(embeds, features, rows, w1, b1, w2[:, :8], b2)
    with pytest.raises(ValueError, match="rows must be"):
        projector_scatter_triton(embeds, features, rows[:1], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="float64"):
        projector_scatter_triton(embeds.double(), features, rows, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="norm_bias without norm_weight"):
        projector_scatter_triton(embeds, features, rows, w1, b1, w2, b2, None, norm_b)
    with pytest.raises(ValueError, match=r"norm_weight has shape \(4,\), expected \(8,\)"):
        projector_scatter_triton(embeds, features, rows, w1, b1, w2, b2, norm_w[:4], norm_b)
    with pytest.raises(ValueError, match="norm_eps=0.0 must be positive"):
        projector_scatter_triton(embeds, features, rows, w1, b1, w2, b2, norm_w, norm_b, 0.0)
    with pytest.raises(ValueError, match="unknown impl='cuda'"):
        projector_scatter(embeds, features, rows, w1, b1, w2, b2, impl="cuda")
    fused = projector_scatter(embeds.clone(), features, rows, w1, b1, w2, b2, norm_w, norm_b, impl="triton")
    torch.testing.assert_close(fused, projector_scatter(embeds, features, rows, w1, b1, w2, b2, norm_w, norm_b),
                               rtol=0, atol=1e-5)  # fmt: skip


@pytest.mark.usefixtures("triton_kernels")
def test_autotuning_keys_on_the_rows_power_of_two(monkeypatch):
    """A batch with a new image count re-tunes the GEMMs only when its rows cross a power of two: the autotune
    key is the bucketed size, not the exact one (which would time every config at every new count). Two configs
    and a stub timer stand in for the GPU's list, so the tuning cache fills under the interpreter too."""
    import triton

    from vlm_core.kernels.fused_projector_kernels import _kernels
    from vlm_core.kernels.triton_runtime import interpreting

    matmul = _kernels(interpreting()).matmul
    first = matmul.configs[0]
    twin = triton.Config({**first.kwargs, "GROUP_M": first.kwargs["GROUP_M"] + 1}, num_warps=first.num_warps,
                         num_stages=first.num_stages)  # fmt: skip
    timed = []

    def bench(*args, config, **kwargs):
        timed.append(config)
        return [1.0 if config is first else 2.0]

    monkeypatch.setattr(matmul, "configs", [first, twin])
    monkeypatch.setattr(matmul, "_bench", bench)
    monkeypatch.setattr(matmul, "cache", {})
    dims = (8, 16, 8)

    def forward_backward(images):
        rows = list(range(0, 2 * images, 2))
        tensors, grad_out, index = make_inputs(2 * images, rows, dims, torch.float32, DEVICE, f"bucket{images}")
        features = tensors["features"].requires_grad_()
        args = [tensors[key] for key in NAMES[2:6]]
        out = projector_scatter_triton(tensors["embeds"], features, index, *args)
        out.backward(grad_out)
        return len(matmul.cache)

    keys_at_20 = forward_backward(20)  # 20 rows: bucket 32
    assert keys_at_20 >= 2 and len(timed) == 2 * keys_at_20  # each new key timed both configs
    assert forward_backward(27) == keys_at_20  # 27 rows, the same bucket: nothing re-tuned
    assert len(timed) == 2 * keys_at_20
    assert forward_backward(40) > keys_at_20  # 40 rows: bucket 64, tuned anew
    assert all(config is first for config in matmul.cache.values())  # the faster config is the one kept
