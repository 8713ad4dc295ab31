"""packed_attention against an independent float64 dense-mask softmax, plus its mask semantics and errors."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from kernel_checks import (
    dense_attention,
    error_report,
    layout_tensors,
    max_err,
    run_with_grads,
)

from vlm_core.kernels import ATTENTION_IMPLS, packed_attention, packed_attention_mask
from vlm_core.model.config import ATTN_IMPLS

# A layout is a list of samples; a sample is a list of spans ("t", n) text or ("i", n) one image.
LAYOUTS = {
    "len1": [[("t", 1)]],
    "len5": [[("t", 5)]],
    "len37_image_start": [[("i", 9), ("t", 28)]],
    "len113_image_middle": [[("t", 40), ("i", 16), ("t", 57)]],
    "image_end": [[("t", 11), ("i", 9)]],
    "adjacent_images": [[("i", 4), ("i", 4), ("t", 3)]],
    "mixed_batch": [
        [("t", 1)],
        [("t", 3), ("i", 9), ("t", 25)],
        [("t", 5), ("i", 4), ("t", 2), ("i", 4), ("t", 3)],
        [("i", 16), ("t", 1)],
        [("t", 19)],  # trailing padding of a row: its own text segment
    ],
}
HEADS = [(4, 4), (4, 2), (8, 2), (6, 3), (6, 2)]  # (Hq, Hkv): GQA ratios 1, 2, 4, and 6 heads


def build_layout(layout):
    """cu_seqlens [n+1] int32, bidir_group [total] int32, and the per-token sample ids [total]."""
    return layout_tensors(layout)


def expected_mask(samples: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The contract written out row by row from the per-token sample ids (independent of cu_seqlens)."""
    total = samples.numel()
    mask = torch.zeros(total, total, dtype=torch.bool)
    columns = torch.arange(total)
    for i in range(total):
        same_image = (groups == groups[i]) & (groups[i] != 0)
        mask[i] = (samples == samples[i]) & ((columns <= i) | same_image)
    return mask


@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("heads", HEADS, ids=[f"hq{hq}_hkv{hkv}" for hq, hkv in HEADS])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_matches_float64_dense_reference(layout_name, heads, head_dim):
    num_q_heads, num_kv_heads = heads
    cu_seqlens, groups, samples = build_layout(LAYOUTS[layout_name])
    total = groups.numel()
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    generator = torch.Generator().manual_seed(zlib.crc32(f"{layout_name}-{heads}-{head_dim}".encode()))
    q = torch.randn(total, num_q_heads, head_dim, generator=generator)
    k = torch.randn(total, num_kv_heads, head_dim, generator=generator)
    v = torch.randn(total, num_kv_heads, head_dim, generator=generator)
    grad_out = torch.randn(total, num_q_heads, head_dim, generator=generator)
    mask = expected_mask(samples, groups)
    scale = 1.0 / math.sqrt(head_dim)

    ours = run_with_grads(
        lambda q_, k_, v_: packed_attention(q_, k_, v_, cu_seqlens, max_seqlen, groups), (q, k, v), grad_out
    )
    want = run_with_grads(lambda q_, k_, v_: dense_attention(q_, k_, v_, mask, scale), (q.double(), k.double(), v.double()), grad_out)
    baseline = run_with_grads(lambda q_, k_, v_: dense_attention(q_, k_, v_, mask, scale), (q, k, v), grad_out)

    for name, got, ref, base in zip(("out", "dq", "dk", "dv"), ours, want, baseline):
        # flash-attn's rule: at most 2x the error of plain fp32 PyTorch against float64, plus a floor of
        # 8 fp32 ulps of the largest value. The floor is needed because both are fp32 with different
        # summation orders (the GQA grads dk/dv reduce over G heads in one einsum here, head by head in
        # the baseline), so the baseline is sometimes luckier by ~3x; measured worst case 4.9e-6 at
        # |ref| ~ 7. A masking or head-mapping bug moves values by O(0.1), far above the bound.
        bound = 2 * max_err(base, ref) + 8 * torch.finfo(torch.float32).eps * ref.abs().max().item()
        assert max_err(got, ref) <= bound, error_report(name, got, ref, base)
        assert torch.isfinite(got).all(), error_report(name, got, ref, base)


@pytest.mark.parametrize("layout_name", ["len113_image_middle", "mixed_batch"])
def test_bfloat16_error_within_twice_plain_bfloat16(layout_name):
    cu_seqlens, groups, samples = build_layout(LAYOUTS[layout_name])
    total = groups.numel()
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(total, 6, 32, generator=generator)
    k = torch.randn(total, 2, 32, generator=generator)
    v = torch.randn(total, 2, 32, generator=generator)
    grad_out = torch.randn(total, 6, 32, generator=generator)
    mask = expected_mask(samples, groups)
    scale = 1.0 / math.sqrt(32)
    low = [x.bfloat16() for x in (q, k, v)]

    ours = run_with_grads(lambda q_, k_, v_: packed_attention(q_, k_, v_, cu_seqlens, max_seqlen, groups), low, grad_out)
    want = run_with_grads(
        lambda q_, k_, v_: dense_attention(q_, k_, v_, mask, scale), [x.double() for x in low], grad_out
    )
    baseline = run_with_grads(lambda q_, k_, v_: dense_attention(q_, k_, v_, mask, scale), low, grad_out)
    assert ours[0].dtype == torch.bfloat16
    for name, got, ref, base in zip(("out", "dq", "dk", "dv"), ours, want, baseline):
        assert max_err(got, ref) <= 2 * max_err(base, ref), error_report(name, got, ref, base)


def test_mask_matches_the_contract_on_a_hand_written_case():
    # Sample 0: text, text, image(2), text. Sample 1: image(2), text.
    cu_seqlens = torch.tensor([0, 5, 8], dtype=torch.int32)
    groups = torch.tensor([0, 0, 1, 1, 0, 2, 2, 0], dtype=torch.int32)
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],  # image token sees the later token of its own image
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 1, 0],  # second sample: never sees the first
            [0, 0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(packed_attention_mask(cu_seqlens, groups, 8), want)
    # Without bidir_group everything is text: block-diagonal causal.
    segment = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    want_text = (segment[:, None] == segment[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(packed_attention_mask(cu_seqlens, None, 8), want_text)


def test_mask_matches_independent_construction_on_mixed_batch():
    cu_seqlens, groups, samples = build_layout(LAYOUTS["mixed_batch"])
    assert torch.equal(packed_attention_mask(cu_seqlens, groups, groups.numel()), expected_mask(samples, groups))


def _perturbation_effect(position: int, layout) -> torch.Tensor:
    """Per-token max change of the output when k and v of one token are replaced."""
    cu_seqlens, groups, _ = build_layout(layout)
    total = groups.numel()
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(total, 2, 8, generator=generator)
    k = torch.randn(total, 2, 8, generator=generator)
    v = torch.randn(total, 2, 8, generator=generator)
    before = packed_attention(q, k, v, cu_seqlens, max_seqlen, groups)
    k2, v2 = k.clone(), v.clone()
    k2[position] = torch.randn(2, 8, generator=generator)
    v2[position] = torch.randn(2, 8, generator=generator)
    after = packed_attention(q, k2, v2, cu_seqlens, max_seqlen, groups)
    return (after - before).abs().amax(dim=(1, 2))  # [total]


# Sample 0 = tokens 0..8: text 0-1, image 2-5, text 6-8. Sample 1 = tokens 9..13: image 9-10, text 11-13.
SEMANTICS_LAYOUT = [[("t", 2), ("i", 4), ("t", 3)], [("i", 2), ("t", 3)]]


def test_no_attention_across_samples():
    effect = _perturbation_effect(9, SEMANTICS_LAYOUT)  # first token of sample 1
    assert torch.all(effect[:9] == 0), f"sample 0 changed when sample 1 changed: {effect[:9].tolist()}"
    assert torch.all(effect[9:] > 0), f"every token of sample 1 should see its first token: {effect[9:].tolist()}"


def test_image_span_is_bidirectional():
    effect = _perturbation_effect(5, SEMANTICS_LAYOUT)  # last image token of sample 0
    assert torch.all(effect[2:5] > 0), f"earlier tokens of the image must see its last token: {effect[2:5].tolist()}"
    assert torch.all(effect[:2] == 0), f"text before the image must not see it: {effect[:2].tolist()}"


def test_text_is_causal():
    effect = _perturbation_effect(7, SEMANTICS_LAYOUT)  # a text token after the image
    assert torch.all(effect[:7] == 0), f"tokens before 7 changed: {effect[:7].tolist()}"
    assert torch.all(effect[7:9] > 0), f"tokens 7, 8 must see token 7: {effect[7:9].tolist()}"


def test_empty_segment_and_oversized_max_seqlen():
    layout = [[("t", 3), ("i", 4)], [("t", 6)]]
    cu_seqlens, groups, samples = build_layout(layout)
    cu_with_empty = torch.tensor([0, 7, 7, 13], dtype=torch.int32)
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(13, 2, 8, generator=generator) for _ in range(3))
    want = dense_attention(q.double(), k.double(), v.double(), expected_mask(samples, groups), 1 / math.sqrt(8))
    got = packed_attention(q, k, v, cu_with_empty, 20, groups)
    # 1e-6: fp32 attention over <= 7 keys of unit-scale values carries a few ulps (~1e-7) of error.
    assert max_err(got, want) < 1e-6, error_report("out", got, want)


def test_softmax_scale_is_applied():
    cu_seqlens, groups, samples = build_layout([[("t", 4), ("i", 3)]])
    generator = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(7, 2, 8, generator=generator) for _ in range(3))
    want = dense_attention(q.double(), k.double(), v.double(), expected_mask(samples, groups), 0.3)
    got = packed_attention(q, k, v, cu_seqlens, 7, groups, softmax_scale=0.3)
    assert max_err(got, want) < 1e-6, error_report("out", got, want)  # same 1e-6 reasoning as above


def test_config_names_only_registered_impls():
    assert set(ATTN_IMPLS) == set(ATTENTION_IMPLS) | {"auto"}  # "auto" is resolved per device, not registered


def _valid_inputs():
    generator = torch.Generator().manual_seed(0)
    return dict(
        q=torch.randn(6, 4, 8, generator=generator),
        k=torch.randn(6, 2, 8, generator=generator),
        v=torch.randn(6, 2, 8, generator=generator),
        cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32),
        max_seqlen=4,
        bidir_group=torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.int32),
    )


INVALID = {
    "q_not_3d": (lambda a: a.update(q=a["q"].reshape(6, 32)), "3-d"),
    "q_integer": (lambda a: a.update(q=a["q"].long()), "dtype"),
    "dtype_mismatch": (lambda a: a.update(k=a["k"].double(), v=a["v"].double()), "dtypes differ"),
    "k_v_shape_mismatch": (lambda a: a.update(v=a["v"][:, :1]), "must match"),
    "token_count_mismatch": (lambda a: a.update(k=a["k"][:5], v=a["v"][:5]), "tokens"),
    "head_dim_mismatch": (lambda a: a.update(k=a["k"][..., :4], v=a["v"][..., :4]), "head_dim"),
    "heads_not_divisible": (lambda a: a.update(k=torch.randn(6, 3, 8), v=torch.randn(6, 3, 8)), "multiple"),
    "cu_seqlens_int64": (lambda a: a.update(cu_seqlens=a["cu_seqlens"].long()), "int32"),
    "cu_seqlens_too_short": (lambda a: a.update(cu_seqlens=torch.tensor([0], dtype=torch.int32)), "at least 2"),
    "cu_seqlens_not_from_zero": (lambda a: a.update(cu_seqlens=torch.tensor([1, 2, 6], dtype=torch.int32)), "start at 0"),
    "cu_seqlens_short_of_total": (lambda a: a.update(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)), "end at total"),
    "cu_seqlens_decreasing": (lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32)), "decreases"),
    "max_seqlen_too_small": (lambda a: a.update(max_seqlen=3), "max_seqlen"),
    "max_seqlen_not_int": (lambda a: a.update(max_seqlen=4.0), "max_seqlen"),
    "bidir_group_length": (lambda a: a.update(bidir_group=a["bidir_group"][:5]), "bidir_group"),
    "bidir_group_int64": (lambda a: a.update(bidir_group=a["bidir_group"].long()), "bidir_group"),
    "softmax_scale_negative": (lambda a: a.update(softmax_scale=-1.0), "softmax_scale"),
    "unknown_impl": (lambda a: a.update(impl="cudnn"), "unknown impl='cudnn'; available: \\['flash_attn'"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_inputs_raise_value_error(case):
    arguments = _valid_inputs()
    packed_attention(**arguments)  # the unmodified inputs are accepted
    modify, message = INVALID[case]
    modify(arguments)
    with pytest.raises(ValueError, match=message):
        packed_attention(**arguments)


def test_prepare_raises_what_the_first_call_would():
    """prepare_packed_attention runs packed_attention's packing checks (one function for both), so a model that
    prepares its batch up front fails there with the same message."""
    from vlm_core.kernels import prepare_packed_attention

    good = torch.tensor([0, 3, 8], dtype=torch.int32)
    prepare_packed_attention(good, 5, torch.zeros(8, dtype=torch.int32), 8, "reference")  # no error
    q = torch.zeros(8, 2, 4)
    cases = [
        (good.float(), 5, None, "must be 1-d int32"),
        (torch.tensor([0, 3, 7], dtype=torch.int32), 5, None, "end at total=8"),
        (good, 4, None, "max_seqlen=4 must be an int >= the longest segment"),
        (good, 5, torch.zeros(7, dtype=torch.int32), "bidir_group must be 1-d int32 of length total=8"),
    ]
    for cu_seqlens, max_seqlen, groups, message in cases:
        with pytest.raises(ValueError, match=message):
            prepare_packed_attention(cu_seqlens, max_seqlen, groups, 8, "reference")
        with pytest.raises(ValueError, match=message):
            packed_attention(q, q, q, cu_seqlens, max_seqlen, groups)
