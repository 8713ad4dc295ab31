"""scripts/cuda_build_check.py: ptxas's report is parsed, our own undefined symbols and warnings are found, and
csrc/'s CUDA build really compiles and links (against PyPI's CUDA torch headers and nvcc wheels; skipped only
when those cannot be fetched)."""

from __future__ import annotations

import shutil

import pytest

from scripts import cuda_build_check as cbc

PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN7vlm_ext22packed_metadata_kernelEPKl' for 'sm_90'
ptxas info    : Function properties for _ZN7vlm_ext22packed_metadata_kernelEPKl
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers, 432 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN7vlm_ext11gather_rowsEv' for 'sm_80'
ptxas info    : Function properties for _ZN7vlm_ext11gather_rowsEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 26 registers, used 0 barriers, 400 bytes cmem[0]
"""


def test_parses_registers_and_spills_per_kernel_and_arch():
    kernels = cbc.parse_ptxas(PTXAS)
    assert [(k.arch, k.registers, k.stack_bytes, k.spill_stores, k.spill_loads) for k in kernels] == [
        ("sm_90", 30, 8, 4, 12), ("sm_80", 26, 0, 0, 0)]
    assert kernels[0].kernel == "_ZN7vlm_ext22packed_metadata_kernelEPKl"


def test_a_register_line_without_its_spill_line_is_an_error():
    broken = PTXAS.replace("    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n", "")
    with pytest.raises(ValueError, match="packed_metadata_kernel"):
        cbc.parse_ptxas(broken)


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt (binutils) is not installed")
def test_kernel_names_are_demangled_without_the_anonymous_namespace():
    kernels = cbc.parse_ptxas(PTXAS.replace("_ZN7vlm_ext22packed_metadata_kernelEPKl",
                                            "_ZN7vlm_ext12_GLOBAL__N_118gather_rows_kernelIfEEvPKT_"))
    cbc.short_kernel_names(kernels)
    assert kernels[0].kernel == "vlm_ext::gather_rows_kernel<float>"


SASS = """\
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

\t\tFunction : _Z4copyI5uint4EvPKT_
\t/*0080*/                   LDG.E.64.CONSTANT R2, desc[UR4][R2.64] ;  /* 0x... */
\t/*0090*/              @!P0 LDG.E.128.CONSTANT R4, desc[UR4][R8.64] ;  /* 0x... */
\t/*00a0*/                   STG.E.128 desc[UR4][R10.64], R4 ;  /* 0x... */
\t\tFunction : _Z4copyIhEvPKT_
\t/*0080*/                   LDG.E.U8.CONSTANT R5, desc[UR4][R2.64] ;  /* 0x... */
\t/*0090*/                   STG.E.U8 desc[UR4][R6.64], R5 ;  /* 0x... */
\t\tFunction : _Z4metav
\t/*0080*/                   LDG.E R5, desc[UR4][R2.64] ;  /* 0x... */
\t/*0090*/                   STG.E.64 desc[UR4][R6.64], R8 ;  /* 0x... */
"""


def test_widest_global_access_per_kernel_from_sass():
    assert cbc.global_access_bits(SASS) == {
        ("sm_90", "_Z4copyI5uint4EvPKT_"): (128, 128),
        ("sm_90", "_Z4copyIhEvPKT_"): (8, 8),
        ("sm_90", "_Z4metav"): (32, 64),
    }


def test_only_our_namespace_counts_as_undefined():
    nm = ("                 U at::_ops::empty::call(c10::ArrayRef<c10::SymInt>)\n"
          "                 U vlm_ext::check_rows_args(char const*, at::Tensor const&, at::Tensor const&, long)\n"
          "                 U cudaLaunchKernel\n")
    assert cbc.undefined_own_symbols(nm) == [
        "vlm_ext::check_rows_args(char const*, at::Tensor const&, at::Tensor const&, long)"]


def test_only_warnings_in_our_sources_count():
    out = ("/x/torch/include/c10/util/Half.h:12: warning: something in torch\n"
           "/repo/csrc/vlm_ext.cpp:40:7: warning: unused variable 'n' [-Wunused-variable]\n")
    assert cbc.our_warnings(out, "/repo/csrc") == [
        "/repo/csrc/vlm_ext.cpp:40:7: warning: unused variable 'n' [-Wunused-variable]"]


@pytest.fixture(scope="module")
def toolchain():
    """nvcc and the CUDA torch headers, fetched once into the cache (skip only if they cannot be fetched)."""
    import torch

    try:
        home = cbc.fetch_cuda(cbc.DEFAULT_CACHE, "13.0", "https://pypi.org/simple")
        version = torch.__version__.split("+")[0]
        include, _ = cbc.fetch_torch_headers(cbc.DEFAULT_CACHE, version, "https://pypi.org/simple")
    except cbc.FetchError as error:
        pytest.skip(f"the CUDA toolchain could not be fetched from PyPI: {str(error).splitlines()[0]}")
    return home, include


@pytest.mark.slow
def test_csrc_compiles_and_links_for_hopper(toolchain, tmp_path):
    report = cbc.check(*toolchain, ["90"], tmp_path / "build")
    assert report.ok, report.error
    widths = {k.kernel: (k.load_bits, k.store_bits) for k in report.kernels}
    vectors = ("unsigned char", "unsigned short", "unsigned int", "uint2", "uint4")
    assert set(widths) == {"vlm_ext::packed_metadata_kernel"} | {
        f"vlm_ext::copy_rows_kernel<{v}, {scatter}>" for v in vectors for scatter in ("false", "true")}
    assert all(k.arch == "sm_90" and k.spill_stores == 0 for k in report.kernels)
    # each row copy stores exactly its vector's width; the 16-byte ones load and store 128 bits
    for v, bits in zip(vectors, (8, 16, 32, 64, 128)):
        assert widths[f"vlm_ext::copy_rows_kernel<{v}, true>"][1] == bits, widths
    assert widths["vlm_ext::copy_rows_kernel<uint4, false>"] == (128, 128), widths


@pytest.mark.slow
def test_a_declaration_the_other_file_does_not_define_fails_the_check(toolchain, tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(cbc.CSRC, csrc)
    cu = csrc / "vlm_ext_cuda.cu"
    text = cu.read_text()
    declaration = "void check_rows_args(const char* op, const at::Tensor& table, const at::Tensor& rows);"
    assert declaration in text
    cu.write_text(text.replace(declaration, declaration.replace("rows);", "rows, int64_t extra = 0);")))
    report = cbc.check(*toolchain, ["90"], tmp_path / "build", csrc)
    assert not report.ok
    assert report.undefined == [
        "vlm_ext::check_rows_args(char const*, at::Tensor const&, at::Tensor const&, long)"], report.undefined
