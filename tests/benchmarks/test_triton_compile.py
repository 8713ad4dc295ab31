"""benchmarks/triton_compile.py: every Triton kernel compiles for Hopper (sm_90) from its op's real launch code,
fits the GPU's limits, and the report's pieces (signature, resources, limits) are right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import triton_compile as tc

REPO = Path(__file__).resolve().parents[2]


def test_resource_line_is_parsed_and_must_be_unique():
    text = (" Common:\n  GLOBAL:11\n Function _fwd_kernel:\n"
            "  REG:255 STACK:248 SHARED:1024 LOCAL:0 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert tc.parse_resource_usage(text) == {"registers": 255, "stack_bytes": 248, "static_shared": 1024,
                                             "local_bytes": 0}
    with pytest.raises(ValueError, match="found 2"):
        tc.parse_resource_usage(text + text)


def test_sass_opcodes_are_counted_without_modifiers_or_predicates():
    text = ("        Function : _fwd_kernel\n"
            "        /*0350*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;  /* 0x... */\n"
            "        /*0360*/              @!P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;  /* 0x... */\n"
            "        /*0370*/              @UP1 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;  /* 0x... */\n"
            "        /*0380*/               @PT LDL.64 R2, [R1+0x8] ;  /* 0x... */\n"
            "        /*0390*/                   EXIT ;  /* 0x... */\n")
    ops = tc.sass_opcodes(text)
    assert ops == {"HGMMA": 2, "HMMA": 1, "LDL": 1, "EXIT": 1}
    assert tc.Compiled("op", "case", "k", "cfg", ok=True, wgmma=ops["HGMMA"], mma=ops["HMMA"]).tensor_cores == "wgmma+mma"
    assert tc.Compiled("op", "case", "k", "cfg", ok=True).tensor_cores == ""


@pytest.mark.parametrize(
    ("shared", "regs", "warps", "problem"),
    [(200 * 1024, 128, 4, ""),
     (230 * 1024, 128, 4, "230 KiB of shared memory, sm_90 allows 227"),
     (16 * 1024, 255, 16, "255 registers x 512 threads > 65536 per SM")],
)
def test_limits_of_sm90(shared, regs, warps, problem):
    c = tc.Compiled("op", "case", "k", "cfg", ok=True, registers=regs, shared_bytes=shared, num_warps=warps)
    got = tc.limit_problem(c, 90)
    assert problem in got if problem else got == ""


def test_signature_specializes_like_the_launcher():
    class P:
        def __init__(self, name, constexpr=False):
            self.name, self.is_constexpr, self.do_not_specialize = name, constexpr, False

    class Jit:
        params = [P("X"), P("n"), P("one"), P("odd"), P("scale"), P("unused"), P("BLOCK", True)]

        def fn(self):  # only its __name__ is used, in errors
            pass

    values = {"X": torch.empty(4, dtype=torch.bfloat16), "n": 4096, "one": 1, "odd": 7, "scale": 0.5,
              "unused": None, "BLOCK": 128}
    sig, consts, attrs = tc.signature(Jit, values)
    assert sig == {"X": "*bf16", "n": "i32", "one": "constexpr", "odd": "i32", "scale": "fp32",
                   "unused": "constexpr", "BLOCK": "constexpr"}
    assert consts == {"one": 1, "unused": None, "BLOCK": 128}
    assert attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    with pytest.raises(ValueError, match="no value for parameter 'n'"):
        tc.signature(Jit, {k: v for k, v in values.items() if k != "n"})


@pytest.mark.slow
def test_every_kernel_and_config_compiles_for_hopper(tmp_path):
    """Every autotune config of every launch of every op, bf16, Dh 32/64/96/128 (~2.5 min on 2 cores; a
    subprocess: the test session runs Triton's interpreter, and compiling needs the GPU-mode kernels)."""
    pytest.importorskip("triton")
    out = tmp_path / "not-yet" / "report.md"  # the script makes the folder
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "benchmarks/triton_compile.py", "--dtypes", "bf16", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    kernels = {(r["op"], r["kernel"].split()[0]) for r in rows}
    assert kernels == {("attention", "forward"), ("attention", "preprocess"), ("attention", "dq"),
                       ("attention", "dkdv"), ("rmsnorm", "forward"), ("rmsnorm", "backward"),
                       ("swiglu", "forward"), ("swiglu", "backward"), ("rope", "rope"),
                       ("projector", "matmul"), ("projector", "column_sum"), ("projector", "layer_norm_stats"),
                       ("projector", "layer_norm_backward"), ("linear_cross_entropy", "rows")}
    assert all(r["ok"] and r["registers"] > 0 for r in rows), [r for r in rows if not r["ok"]]
    # seven GEMM kinds (d W2 also with GELU in its loads), two of them also with the LayerNorm in their loads, the
    # column sum, the LayerNorm's two kernels
    assert len({r["kernel"] for r in rows if r["op"] == "projector"}) == 12
    # the dK/dV kernel with and without the atomic dQ, at each head dim
    assert {r["kernel"] for r in rows if r["op"] == "attention" and r["kernel"].startswith("dkdv")} == {
        "dkdv", "dkdv +atomic dq"}
    # every autotuned launch keeps at least one config that does not spill registers
    launches = {(r["op"], r["kernel"], r["case"]) for r in rows}
    for launch in launches:
        mine = [r for r in rows if (r["op"], r["kernel"], r["case"]) == launch]
        assert any(r["stack_bytes"] + r["local_bytes"] == 0 for r in mine), (launch, mine)
    # the projector's GELU epilogues, run in column slices, spill at no config (whole, d act's spilled up to
    # 1608 bytes a thread at 128x256 and fed GEMM 1's 128x256 tiles 152)
    gelu_epilogues = [r for r in rows if r["kernel"].startswith(("matmul fwd_gelu", "matmul bwd_dact"))]
    assert len(gelu_epilogues) == 24 and all(r["stack_bytes"] + r["local_bytes"] == 0 for r in gelu_epilogues), [
        (r["kernel"], r["config"], r["stack_bytes"]) for r in gelu_epilogues if r["stack_bytes"] + r["local_bytes"]]
    # Hopper's tensor cores: every config of the matrix kernels issues wgmma (HGMMA), none falls back to
    # Ampere's mma.sync (HMMA), and the kernels without a tl.dot issue neither. One exception: the atomic dQ's
    # product dQ^T = K^T dS has Dh rows, below wgmma's 64 at Dh 32
    matrix = {("attention", "forward"), ("attention", "dq"), ("attention", "dkdv"), ("projector", "matmul")}
    for r in rows:
        on_matrix = (r["op"], r["kernel"].split()[0]) in matrix
        mma_allowed = r["kernel"] == "dkdv +atomic dq" and r["case"].endswith("Dh=32")
        assert (r["wgmma"] > 0) == on_matrix and (r["mma"] == 0 or mma_allowed), r
    # the matrix kernels' loads are pipelined as deep as their configs ask: a gather inside the K loop (d W2's
    # once did) leaves one buffer fewer. Not the LayerNorm or GELU variants, whose transformed operand passes
    # through registers; nor single-stage configs, which stage nothing.
    plain = [r for r in rows if (r["op"], r["kernel"].split()[0]) in matrix and r["num_stages"] > 1
             and "LayerNorm" not in r["kernel"] and r["kernel"] != "matmul bwd_dw2_gelu"]
    assert len(plain) > 100 and all(r["buffers"] == r["num_stages"] for r in plain), [
        (r["kernel"], r["config"], r["buffers"]) for r in plain if r["buffers"] != r["num_stages"]]


def test_tile_buffers_are_read_from_the_gpu_ir():
    ir = """
    %a = ttg.local_alloc : () -> !ttg.memdesc<3x64x128xbf16, #shared, #smem, mutable> loc(#loc1)
    %b = ttg.local_alloc : () -> !ttg.memdesc<2x64x256xbf16, #shared1, #smem, mutable> loc(#loc2)
    %i = ttg.local_alloc : () -> !ttg.memdesc<1x64xi64, #shared2, #smem, mutable> loc(#loc3)
    %s = ttg.local_alloc : () -> !ttg.memdesc<2x32xf32, #shared2, #smem, mutable> loc(#loc4)
    %r = ttg.local_alloc %x : (tensor<64x64xbf16, #blocked>) -> !ttg.memdesc<64x64xbf16, #shared, #smem>
    """
    assert tc.operand_buffers(ir) == 2  # the fewest copies of a staged tile; vectors and register copies aside
    assert tc.operand_buffers("%t = ttg.local_alloc : () -> !ttg.memdesc<64x128xf16, #shared, #smem, mutable>") == 1
    assert tc.operand_buffers("tt.func @k() { tt.return }") == 0


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "benchmarks/triton_compile.py", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "TRITON_INTERPRET=0" in proc.stderr
