"""The compiled extension (csrc/) against the Python references, and the logged fallback without it.

``make setup`` builds vlm_core/_ext.so (CI runs it through ``make test``); without that build the
fixture compiles the CPU part here with torch.utils.cpp_extension into a cache folder (~20 s once).
The extension tests skip only where no C++ compiler (or ninja) exists, saying so.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from kernel_checks import generator

from vlm_core.data.packing import pack
from vlm_core.kernels import ext
from vlm_core.types import TokenizedSample

IMAGE = 3  # image token id
P = 4  # tokens per image


@pytest.fixture(scope="module")
def extension() -> str:
    loaded, reason = ext.load_extension()
    if loaded:
        return reason
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip(f"{reason}; and no C++ compiler here to build it")
    if shutil.which("ninja") is None:
        pytest.skip(f"{reason}; and torch.utils.cpp_extension needs ninja to build it here (pip install ninja)")
    build_dir = Path(os.environ.get("VLM_EXT_BUILD_DIR", Path.home() / ".cache" / "vlm-data-metabolism" / "ext-build"))
    return ext.build_extension(build_dir)


def sample(spans, g, name):
    """A TokenizedSample from spans ("t", n) text and ("i",) one image of P tokens."""
    ids, groups, images = [], [], 0
    for span in spans:
        if span[0] == "t":
            ids.append(torch.randint(IMAGE + 1, 50, (span[1],), generator=g))
            groups.append(torch.zeros(span[1], dtype=torch.int32))
        else:
            images += 1
            ids.append(torch.full((P,), IMAGE))
            groups.append(torch.full((P,), images, dtype=torch.int32))
    input_ids = torch.cat(ids)
    return TokenizedSample(input_ids=input_ids, loss_mask=torch.rand(input_ids.numel(), generator=g) < 0.5,
                           bidir_group=torch.cat(groups), images=torch.zeros(images, 3, 2, 2), sample_id=name)  # fmt: skip


def packed_batches():
    """Batches from vlm_core.data.packing.pack: several rows with padding segments, images at the start,
    middle and end of samples, two images back to back, a text-only and a one-token sample."""
    g = generator("ext-packing")
    layouts = [
        [[("i",), ("t", 5)], [("t", 3), ("i",), ("t", 2), ("i",), ("i",), ("t", 1)], [("t", 7), ("i",)], [("t", 1)]],
        [[("t", 13)], [("i",), ("t", 2)], [("t", 4), ("i",), ("t", 6)], [("i",), ("i",)]],
    ]
    return [pack([sample(spans, g, f"s{i}") for i, spans in enumerate(layout)], row_len=20) for layout in layouts]


@pytest.mark.parametrize("impl", ["reference", "extension"])
def test_packed_metadata_matches_the_packer(impl, request):
    if impl == "extension":
        request.getfixturevalue("extension")
    for batch in packed_batches():
        seqlens = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
        cu_seqlens, position_ids, bidir_group = ext.packed_metadata(batch.input_ids, seqlens, IMAGE, P, impl=impl)
        assert torch.equal(cu_seqlens, batch.cu_seqlens) and cu_seqlens.dtype == torch.int32
        assert torch.equal(position_ids, batch.position_ids) and position_ids.dtype == torch.int64
        assert torch.equal(bidir_group, batch.bidir_group) and bidir_group.dtype == torch.int32


@pytest.mark.usefixtures("extension")
def test_packed_metadata_extension_equals_reference_on_random_streams():
    g = generator("ext-random")
    for trial in range(50):
        lengths = torch.randint(0, 30, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        ids = torch.randint(IMAGE + 1, 20, (int(lengths.sum()),), generator=g)
        for start in torch.randint(0, max(1, ids.numel()), (3,), generator=g).tolist():  # plant whole images
            ids[start : start + P] = IMAGE
        for seqlens in (lengths, lengths.int()):
            try:
                want = ext.packed_metadata_reference(ids, seqlens, IMAGE, P)
            except ValueError as error:  # a planted image cut by a segment end or another image
                with pytest.raises(ValueError, match="not a whole number of images"):
                    ext.packed_metadata(ids, seqlens, IMAGE, P, impl="extension")
                assert "not a whole number of images" in str(error)
                continue
            got = ext.packed_metadata(ids, seqlens, IMAGE, P, impl="extension")
            for name, a, b in zip(("cu_seqlens", "position_ids", "bidir_group"), got, want):
                assert torch.equal(a, b) and a.dtype == b.dtype, f"trial {trial} {name}: {a.tolist()} vs {b.tolist()}"


@pytest.mark.parametrize("impl", ["reference", "extension"])
@pytest.mark.parametrize(
    ("ids", "seqlens", "message"),
    [([IMAGE] * 3 + [9], [4], "not a whole number of images"),  # a 3-token image
     ([9, IMAGE, IMAGE, IMAGE, IMAGE, 9], [3, 3], "not a whole number of images"),  # an image cut by a segment end
     ([9, 9], [1], "sum to 1"), ([9, 9], [3, -1], "negative")],
)
def test_packed_metadata_rejects_bad_streams(impl, ids, seqlens, message, request):
    if impl == "extension":
        request.getfixturevalue("extension")
    with pytest.raises(ValueError, match=message):
        ext.packed_metadata(torch.tensor(ids), torch.tensor(seqlens), IMAGE, P, impl=impl)


@pytest.mark.usefixtures("extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scatter_and_gather_rows_match_the_reference_with_gradients(dtype):
    g = generator(f"ext-rows-{dtype}")
    dst = torch.randn(13, 7, generator=g).to(dtype)
    src = torch.randn(5, 7, generator=g).to(dtype)
    rows = torch.tensor([0, 3, 4, 9, 12])
    grad = torch.randn(13, 7, generator=g).to(dtype)
    results = {}
    for impl in ("reference", "extension"):
        d, s = dst.clone().requires_grad_(True), src.clone().requires_grad_(True)
        out = ext.scatter_rows(d * 1, rows, s, impl=impl)
        gathered = ext.gather_rows(out, rows[[4, 0, 0]], impl=impl)  # repeated rows accumulate
        (out * grad).sum().add((gathered * gathered).sum()).backward()
        results[impl] = (out.detach(), gathered.detach(), d.grad, s.grad)
    for name, a, b in zip(("scatter", "gather", "d dst", "d src"), results["extension"], results["reference"]):
        assert torch.equal(a, b), f"{name}: max diff {(a.double() - b.double()).abs().max().item():.3e}"


@pytest.mark.usefixtures("extension")
def test_rows_out_of_range_raise_value_error():
    with pytest.raises(ValueError, match="outside"):
        ext.gather_rows(torch.zeros(3, 2), torch.tensor([3]), impl="extension")
    with pytest.raises(ValueError, match="outside"):
        ext.scatter_rows(torch.zeros(3, 2), torch.tensor([-1]), torch.zeros(1, 2), impl="extension")


def test_without_the_extension_auto_falls_back_once_and_logged(monkeypatch, caplog):
    monkeypatch.setattr(ext, "load_extension", lambda: (False, "vlm_core._ext is not built (in this test)"))
    ext._log_fallback.cache_clear()
    caplog.set_level(logging.INFO, logger="vlm_core.kernels.ext")
    ids, seqlens = torch.tensor([9, IMAGE, IMAGE, IMAGE, IMAGE]), torch.tensor([5])
    for _ in range(3):
        got = ext.packed_metadata(ids, seqlens, IMAGE, P)
    assert torch.equal(got[2], torch.tensor([0, 1, 1, 1, 1], dtype=torch.int32))
    messages = [r.getMessage() for r in caplog.records if r.name == "vlm_core.kernels.ext"]
    assert messages == [
        ("packed_metadata: the compiled extension cannot run on cpu (vlm_core._ext is not built (in this test)); "
         "using the Python reference")
    ]
    with pytest.raises(RuntimeError, match="impl='extension' but vlm_core._ext is not built"):
        ext.gather_rows(torch.zeros(2, 2), torch.tensor([0]), impl="extension")
    ext._log_fallback.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_match_the_cpu_twins(extension):
    ok, reason = ext.extension_status("cuda")
    if not ok:
        pytest.skip(reason)
    for batch in packed_batches():
        seqlens = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
        got = ext.packed_metadata(batch.input_ids.cuda(), seqlens.cuda(), IMAGE, P, impl="extension")
        for a, b in zip(got, (batch.cu_seqlens, batch.position_ids, batch.bidir_group)):
            assert torch.equal(a.cpu(), b)
    with pytest.raises(ValueError, match="not a whole number"):
        ext.packed_metadata(torch.tensor([IMAGE] * 3, device="cuda"), torch.tensor([3], device="cuda"), IMAGE, P)
    src = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    rows = torch.randperm(4096, device="cuda")[:2304]
    assert torch.equal(ext.gather_rows(src, rows, impl="extension"), src[rows])
    dst = src.clone()
    ext.scatter_rows(dst, rows, src[:2304] * 2, impl="extension")
    assert torch.equal(dst[rows], src[:2304] * 2)


def _random_table(rows: int, width: int, dtype: torch.dtype, offset: int, device: str, g) -> torch.Tensor:
    """A contiguous (rows, width) table of random bits whose base sits ``offset`` elements into its storage."""
    bits = torch.randint(0, 256, ((rows * width + offset) * dtype.itemsize,), generator=g, dtype=torch.uint8)
    return bits.view(dtype)[offset:].view(rows, width).to(device)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits (random bits include NaNs, which torch.equal would call unequal)."""
    return t.contiguous().view(torch.uint8)


# Each case picks another access width in the CUDA kernels: the widest of 16/8/4/2/1 bytes that divides the
# row's bytes and both base addresses (csrc/vlm_ext_cuda.cu). The CPU twins copy rows with memcpy.
ROW_COPY_CASES = [
    pytest.param(torch.bfloat16, 4096, 0, 2304, id="bf16-8KiB-rows-16B"),
    pytest.param(torch.bfloat16, 1024, 1, 700, id="bf16-base-off-by-2B-2B"),
    pytest.param(torch.float32, 1024, 2, 700, id="fp32-base-off-by-8B-8B"),
    pytest.param(torch.bfloat16, 2, 0, 700, id="bf16-4B-rows-4B"),
    pytest.param(torch.float16, 1, 0, 700, id="fp16-2B-rows-2B"),
    pytest.param(torch.uint8, 3, 0, 700, id="u8-3B-rows-1B"),
    pytest.param(torch.uint8, 1, 0, 600_000, id="u8-600k-rows-grid-stride"),  # > 65,535 blocks of 8 rows
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize(("dtype", "width", "offset", "count"), ROW_COPY_CASES)
def test_row_copies_move_exact_bits_at_every_access_width(extension, device, dtype, width, offset, count):
    ok, reason = ext.extension_status(device)
    if not ok:
        pytest.skip(reason)
    g = generator(f"ext-row-copy-{dtype}-{width}-{offset}-{count}")
    total = count + 97
    table = _random_table(total, width, dtype, offset, device, g)
    rows = torch.randperm(total, generator=g)[:count].to(device)
    assert torch.equal(as_bytes(torch.ops.vlm_ext.gather_rows(table, rows)), as_bytes(table[rows]))
    src = _random_table(count, width, dtype, 0, device, g)
    want = table.clone()
    want[rows] = src
    torch.ops.vlm_ext.scatter_rows_(table, rows, src)
    assert torch.equal(as_bytes(table), as_bytes(want))
