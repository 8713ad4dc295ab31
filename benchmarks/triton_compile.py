"""Compile every Triton kernel for a GPU architecture without a GPU, and report what each config costs.

The CPU tests run the kernels in Triton's interpreter, which never lowers them to PTX: a kernel can pass
there and still fail to compile for a GPU, need more shared memory than the GPU has, or spill registers.
This script runs each op's own launch code (its wrappers, at the shapes given below) with the kernels
swapped for recorders, so that it sees exactly the arguments, constexprs and launch options a real run
passes; then it compiles every launch for ``--arch`` with ``triton.compile`` (every autotune config that
survives the op's own pruning for that dtype) and reads the cubin's resources with the cuobjdump that
ships with Triton. Nothing runs on a device.

Per compiled config: registers per thread, stack bytes (in these kernels, where every helper is inlined,
a stack frame means spilled registers), dynamic shared memory, whether it fits the architecture's
limits (sm_90: 227 KiB of shared memory per block, 255 registers per thread, 64K registers per SM), and
which tensor-core instructions its SASS issues: on Hopper a ``tl.dot`` should become ``HGMMA`` (wgmma,
a warpgroup of 4 warps on a 64-row tile); ``HMMA`` (Ampere's mma.sync) is the slower path Triton takes
when a tile or warp count rules wgmma out. A config that fails to compile or does not fit makes the
exit status 1.

    TRITON_INTERPRET=0 python benchmarks/triton_compile.py                  # sm_90, all ops, bf16 + fp16
    TRITON_INTERPRET=0 python benchmarks/triton_compile.py --quick          # first config of each launch
    TRITON_INTERPRET=0 python benchmarks/triton_compile.py --arch 80 --ops attention
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.provenance import git_commit  # noqa: E402

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
           torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
# Per-block limits by compute capability: (shared memory bytes a block may opt into, registers per thread,
# registers per SM). CUDA C Programming Guide, "Technical Specifications per Compute Capability".
LIMITS = {80: (166912, 255, 65536), 86: (101376, 255, 65536), 89: (101376, 255, 65536),
          90: (232448, 255, 65536), 100: (232448, 255, 65536)}


@dataclasses.dataclass
class Launch:
    """One kernel launch as an op's wrapper made it: the kernel object (JITFunction or Autotuner) and its arguments."""

    op: str
    case: str
    name: str
    kernel: object
    args: tuple
    kwargs: dict

    @property
    def jit(self):
        """The JITFunction (an Autotuner wraps it)."""
        return self.kernel.fn if getattr(self.kernel, "configs", None) is not None else self.kernel

    def named(self) -> dict:
        """The launch's arguments by parameter name, keyword arguments (launch options too) included."""
        return dict(zip((p.name for p in self.jit.params), self.args)) | self.kwargs


@dataclasses.dataclass
class Compiled:
    op: str
    case: str
    kernel: str
    config: str
    ok: bool
    registers: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    num_stages: int = 0
    buffers: int = 0  # the fewest shared-memory copies of any tile the kernel stages (operand_buffers); 0: none
    shared_bytes: int = 0
    wgmma: int = 0  # HGMMA instructions in the SASS: Hopper's warpgroup tensor-core MMA (sm_90a)
    mma: int = 0  # HMMA instructions: the warp-level mma.sync of Ampere, a slower path on Hopper
    num_warps: int = 0
    seconds: float = 0.0
    problem: str = ""

    @property
    def spill_bytes(self) -> int:
        """Stack plus local memory: spilled registers, since every helper in these kernels is inlined."""
        return self.stack_bytes + self.local_bytes

    @property
    def tensor_cores(self) -> str:
        """Which tensor-core instructions the SASS issues: "wgmma", "mma", both, or "" for none."""
        return "+".join(name for name, count in (("wgmma", self.wgmma), ("mma", self.mma)) if count)


class _Recorder:
    def __init__(self, op: str, case: str, name: str, kernel: object, sink: list[Launch]):
        self.op, self.case, self.name, self.kernel, self.sink = op, case, name, kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.op, self.case, self.name, self.kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def recording(module, kernels_module, op: str, case: str, sink: list[Launch]) -> Iterator[None]:
    """Swap ``module._kernels`` (the GPU-mode kernels of ``kernels_module``) for recorders while the block runs."""
    import types

    real = kernels_module._kernels(False)
    fake = types.SimpleNamespace(**{n: _Recorder(op, case, n, k, sink) for n, k in vars(real).items()})
    saved = module._kernels
    module._kernels = lambda interpret: fake
    try:
        yield
    finally:
        module._kernels = saved


# --------------------------------------------------------------------------------------------
# The ops' launch code at real shapes (CPU tensors; only shapes, dtypes and strides matter)
# --------------------------------------------------------------------------------------------


def _attention(dtype: torch.dtype, head_dim: int, sink: list[Launch]) -> None:
    from vlm_core.kernels import packed_attention_kernels as pak
    from vlm_core.kernels import packed_attention_triton as pat

    total, hq, hkv = 4096, 16, 4  # GQA 4:1; two samples, an image span in the first
    q = torch.empty(total, hq, head_dim, dtype=dtype)
    k, v = torch.empty(total, hkv, head_dim, dtype=dtype), torch.empty(total, hkv, head_dim, dtype=dtype)
    cu_seqlens = torch.tensor([0, 2048, total], dtype=torch.int32)
    bidir = torch.zeros(total, dtype=torch.int32)
    bidir[100:676] = 1
    windows = pat.packed_attention_windows(cu_seqlens, bidir, total)
    with recording(pat, pak, "attention", f"{_DTYPES[dtype]} Dh={head_dim}", sink):
        out, lse = pat._forward(q, k, v, windows, 0.125, 2048)
        pat._backward(torch.empty_like(q), q, k, v, out, lse, windows, 0.125, 2048)
        pat._backward(torch.empty_like(q), q, k, v, out, lse, windows, 0.125, 2048, atomic_dq=True)


def _rmsnorm(dtype: torch.dtype, dim: int, sink: list[Launch]) -> None:
    from vlm_core.kernels import rmsnorm

    x, w = torch.empty(64, dim, dtype=dtype), torch.empty(dim, dtype=dtype)
    with recording(rmsnorm, rmsnorm, "rmsnorm", f"{_DTYPES[dtype]} D={dim}", sink):
        _, rstd = rmsnorm._forward(x, w, 1e-6)
        rmsnorm._backward(torch.empty_like(x), x, w, rstd)


def _swiglu(dtype: torch.dtype, sink: list[Launch]) -> None:
    from vlm_core.kernels import swiglu

    gate = torch.zeros(64, 4096, dtype=dtype, requires_grad=True)
    up = torch.zeros(64, 4096, dtype=dtype, requires_grad=True)
    with recording(swiglu, swiglu, "swiglu", f"{_DTYPES[dtype]} H=4096", sink):
        swiglu._SwiGLUFunction.apply(gate, up).float().sum().backward()


def _rope(dtype: torch.dtype, head_dim: int, sink: list[Launch]) -> None:
    from vlm_core.kernels import rope

    q, k = torch.empty(256, 16, head_dim, dtype=dtype), torch.empty(256, 4, head_dim, dtype=dtype)
    cos = torch.empty(4096, head_dim // 2, dtype=torch.float32)
    positions = torch.zeros(256, dtype=torch.int64)
    with recording(rope, rope, "rope", f"{_DTYPES[dtype]} Dh={head_dim}", sink):
        rope._launch(q, k, q, k, cos, cos, positions, backward=False)
        rope._launch(q, k, torch.empty_like(q), torch.empty_like(k), cos, cos, positions, backward=True)


def _projector(dtype: torch.dtype, sink: list[Launch]) -> None:
    from vlm_core.kernels import fused_projector as fp

    m, dim_v, dim_h, dim = 2304, 1024, 4096, 4096  # 4 images of 576 patches; CLIP-L width into a 4096 decoder
    embeds = torch.empty(8192, dim, dtype=dtype)
    x = torch.empty(m, dim_v, dtype=dtype)
    rows = torch.arange(m, dtype=torch.int64)
    w1, b1 = torch.empty(dim_h, dim_v, dtype=dtype), torch.empty(dim_h, dtype=dtype)
    w2, b2 = torch.empty(dim, dim_h, dtype=dtype), torch.empty(dim, dtype=dtype)
    norm_wb = torch.empty(dim_v, dtype=dtype), torch.empty(dim_v, dtype=dtype)
    with recording(fp, fp, "projector", f"{_DTYPES[dtype]} {m}x{dim_v}->{dim_h}->{dim}", sink):
        pre = fp._forward(embeds, x, rows, w1, b1, w2, b2, None)
        fp._backward(embeds, x, rows, w1, w2, pre, None, (True,) * 5 + (False,) * 2)
        # only fc2 trained (tower, fc1 frozen): no d pre, so d W2 recomputes GELU in its loads
        fp._backward(embeds, x, rows, w1, w2, pre, None, (False,) * 3 + (True,) * 2 + (False,) * 2)
        # with InternVL's LayerNorm in GEMM 1's loads: the same GEMMs, two of them with a +LayerNorm variant
        norm = fp._Norm(*fp._layer_norm_stats(x, 1e-5), *norm_wb)
        pre = fp._forward(embeds, x, rows, w1, b1, w2, b2, norm)
        fp._backward(embeds, x, rows, w1, w2, pre, norm, (True,) * 7)


def _linear_cross_entropy(dtype: torch.dtype, sink: list[Launch]) -> None:
    from vlm_core.kernels import linear_cross_entropy as lce

    hidden, weight = torch.zeros(8, 64, dtype=dtype), torch.zeros(32000, 64, dtype=dtype)
    labels = torch.zeros(8, dtype=torch.int64)
    with recording(lce, lce, "linear_cross_entropy", f"{_DTYPES[dtype]} V=32000", sink):
        lce._chunked_forward(hidden, weight, labels, None, -100, 8, True, True)


def cases(ops: list[str], dtypes: list[torch.dtype], head_dims: list[int]) -> list[Callable[[list[Launch]], None]]:
    """The launch drivers to run: one per (op, dtype, size)."""
    out: list[Callable[[list[Launch]], None]] = []
    for dtype in dtypes:
        if "attention" in ops:
            out += [lambda s, d=dtype, h=h: _attention(d, h, s) for h in head_dims]
        if "rmsnorm" in ops:
            out += [lambda s, d=dtype, n=n: _rmsnorm(d, n, s) for n in (1024, 4096, 8192)]
        if "swiglu" in ops:
            out.append(lambda s, d=dtype: _swiglu(d, s))
        if "rope" in ops:
            out += [lambda s, d=dtype, h=h: _rope(d, h, s) for h in head_dims]
        if "projector" in ops:
            out.append(lambda s, d=dtype: _projector(d, s))
        if "linear_cross_entropy" in ops:
            out.append(lambda s, d=dtype: _linear_cross_entropy(d, s))
    return out


# --------------------------------------------------------------------------------------------
# Compiling a launch
# --------------------------------------------------------------------------------------------


# the GEMM kinds in the order of vlm_core/kernels/fused_projector_kernels.py
_PROJECTOR_KINDS = ("fwd_gelu", "fwd_scatter", "bwd_dact", "bwd_dw2", "bwd_dw1", "bwd_dx", "bwd_dw2_gelu")


def kernel_label(launch: Launch) -> str:
    """The kernel's name, plus which of its variants this launch is where one kernel serves several."""
    if launch.name == "matmul":  # fused_projector: one kernel for its six GEMMs, two with a LayerNorm variant
        named = launch.named()
        norm = " +LayerNorm" if named["NORM_A"] or named["NORM_B"] else ""
        return f"matmul {_PROJECTOR_KINDS[named['kind']]}{norm}"
    if launch.name == "rope":
        return "rope bwd" if launch.kwargs.get("BACKWARD") else "rope fwd"
    if launch.name == "dkdv" and launch.kwargs.get("ATOMIC_DQ"):
        return "dkdv +atomic dq"
    return launch.name


def _configs(launch: Launch) -> list:
    """The autotune configs this launch would try (after the op's own pruning), or [None] for a plain kernel."""
    configs = getattr(launch.kernel, "configs", None)
    if configs is None:
        return [None]
    prune = getattr(launch.kernel, "early_config_prune", None)
    if prune is not None:
        configs = prune(configs, launch.named(), **launch.kwargs)
    return list(configs)


def signature(jit, values: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compile`` as Triton's launcher would specialize ``values``:
    pointers and ints divisible by 16 get the divisibility hint, an int equal to 1 becomes a constant."""
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(jit.params):
        if p.name not in values:
            raise ValueError(f"{jit.fn.__name__}: no value for parameter {p.name!r}")
        value = values[p.name]
        if p.is_constexpr or value is None or isinstance(value, str):
            sig[p.name], consts[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[p.name] = "*" + _DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not p.do_not_specialize:
                sig[p.name], consts[p.name] = "constexpr", 1
            else:
                sig[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0 and not p.do_not_specialize:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{jit.fn.__name__}: parameter {p.name!r} has a {type(value).__name__} value")
    return sig, consts, attrs


_RESOURCE = re.compile(r"REG:(?P<reg>\d+) STACK:(?P<stack>\d+) SHARED:(?P<shared>\d+) LOCAL:(?P<local>\d+)")


def parse_resource_usage(text: str) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL of the one function in ``cuobjdump --dump-resource-usage`` output."""
    found = _RESOURCE.findall(text)
    if len(found) != 1:
        raise ValueError(f"expected one function's resource line in cuobjdump's output, found {len(found)}:\n{text}")
    reg, stack, shared, local = (int(x) for x in found[0])
    return {"registers": reg, "stack_bytes": stack, "static_shared": shared, "local_bytes": local}


# An instruction line of cuobjdump -sass: "/*0350*/  @!P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], ... ;"
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def sass_opcodes(text: str) -> Counter:
    """How often each opcode (without its modifiers) occurs in ``cuobjdump -sass`` output."""
    return Counter(_SASS_OPCODE.findall(text))


# A shared-memory allocation in Triton's GPU IR: "ttg.local_alloc : () -> !ttg.memdesc<3x64x128xbf16, ...>"
_LOCAL_ALLOC = re.compile(r"ttg\.local_alloc : \(\) -> !ttg\.memdesc<((?:\d+x)+)([a-z]+)(\d+)\b")


def operand_buffers(ttgir: str) -> int:
    """The fewest copies Triton's pipeliner keeps of any 2-d tile in shared memory: the leading dim of a 3-d
    allocation (one copy per stage in flight), 1 for a 2-d tile of 16 bits or less; 0 where the kernel stages
    no tile. (2-d allocations of wider types are staged vectors: indices, row statistics.) Below the config's
    num_stages, some load of the loop is pipelined less deep: a load whose address comes from another load in
    the loop, or an operand transformed in registers before its product."""
    counts = []
    for dims, kind, bits in _LOCAL_ALLOC.findall(ttgir):
        shape = [int(d) for d in dims.rstrip("x").split("x")]
        if len(shape) >= 3:
            counts.append(shape[0])
        elif len(shape) == 2 and kind in ("bf", "f") and int(bits) <= 16:
            counts.append(1)
    return min(counts, default=0)


def compile_launch(launch: Launch, config, arch: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    named = launch.named()
    values = {k: v for k, v in named.items() if k not in _LAUNCH_OPTIONS}
    options = {k: v for k, v in named.items() if k in _LAUNCH_OPTIONS}
    if config is not None:
        values |= config.kwargs
        options |= {"num_warps": config.num_warps, "num_stages": config.num_stages}
    values = {k: (False if k == "INTERPRET_BF16" else v) for k, v in values.items()}
    tuned = ("GROUP_M", "EPILOGUE_SLICE")
    blocks = ",".join(f"{k}={v}" for k, v in values.items() if k.startswith("BLOCK") or k in tuned)
    warps, stages = options.get("num_warps", 4), options.get("num_stages", 3)
    label = f"{blocks} w{warps} s{stages}"
    result = Compiled(launch.op, launch.case, kernel_label(launch), label, ok=False, num_warps=warps,
                      num_stages=stages)
    start = time.perf_counter()
    try:
        sig, consts, attrs = signature(launch.jit, values)
        compiled = triton.compile(ASTSource(fn=launch.jit, signature=sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # a compile failure is a finding to report, not a crash of the report
        result.problem = f"compile failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
        return result
    result.seconds = round(time.perf_counter() - start, 2)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()

        def dump(flag: str) -> str:
            return subprocess.run([str(cuobjdump), flag, cubin.name], capture_output=True, text=True,
                                  check=True).stdout

        usage = parse_resource_usage(dump("--dump-resource-usage"))
        opcodes = sass_opcodes(dump("--dump-sass"))
    result.wgmma, result.mma = opcodes["HGMMA"], opcodes["HMMA"]
    result.buffers = operand_buffers(compiled.asm["ttgir"])
    result.registers, result.stack_bytes = usage["registers"], usage["stack_bytes"]
    result.local_bytes = usage["local_bytes"]
    result.shared_bytes = compiled.metadata.shared + usage["static_shared"]
    result.problem = limit_problem(result, arch)
    result.ok = not result.problem
    return result


def limit_problem(c: Compiled, arch: int) -> str:
    """Why a compiled config cannot launch on ``arch`` (shared memory or registers), or ""."""
    shared_max, regs_max, regs_per_sm = LIMITS[arch]
    problems = []
    if c.shared_bytes > shared_max:
        problems.append(f"needs {c.shared_bytes / 1024:.0f} KiB of shared memory, "
                        f"sm_{arch} allows {shared_max / 1024:.0f}")
    if c.registers > regs_max:
        problems.append(f"{c.registers} registers per thread > {regs_max}")
    if c.registers * 32 * c.num_warps > regs_per_sm:
        problems.append(f"{c.registers} registers x {32 * c.num_warps} threads > {regs_per_sm} per SM")
    return "; ".join(problems)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _versions() -> str:
    import triton

    commit = git_commit()
    # Changes to the code, not to benchmarks/results (reports being rewritten, this one or a concurrent run's)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude)benchmarks/results"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    commit += " with uncommitted changes" if dirty else ""
    return (f"commit {commit}, triton {triton.__version__}, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.machine()}")


def write_report(rows: list[Compiled], arch: int, command: str, path: Path) -> None:
    spilled = [r for r in rows if r.ok and r.spill_bytes]
    versions = _versions()
    lines = [f"# Triton kernels compiled for sm_{arch} (no GPU)", "",
             f"- date: {datetime.date.today()}; {versions}",
             f"- command: `{command}`",
             "- what: every launch each op's wrapper makes at the shapes in `benchmarks/triton_compile.py`, compiled "
             "with `triton.compile` for every autotune config left after the op's own pruning; resources from the "
             "cubin (`cuobjdump --dump-resource-usage`), tensor-core instructions from its SASS (`cuobjdump "
             "--dump-sass`: HGMMA = wgmma, Hopper's warpgroup MMA; HMMA = Ampere's mma.sync), tile buffers from "
             "Triton's GPU IR (the fewest shared-memory copies of any staged tile; below the config's stages, a "
             "load of the loop is pipelined less deep). Compile-time facts, not speed: nothing ran on a GPU.",
             f"- {len(rows)} configs compiled: {sum(r.ok for r in rows)} fit sm_{arch}, "
             f"{sum(not r.ok for r in rows)} do not; {len(spilled)} of those that fit spill registers "
             "(a stack frame: every helper is inlined, so the stack holds spills). Tensor cores: "
             f"{sum(r.wgmma > 0 for r in rows)} configs issue wgmma (HGMMA), {sum(r.mma > 0 for r in rows)} "
             "mma.sync (HMMA); the rest have no matrix product.", "",
             "## Spill-free configs the autotuner can choose from (autotuned kernels)", "",
             "| op | kernel | case | spill-free / compiled | spill-free on wgmma | fewest registers | most shared KiB |",
             "|---|---|---|---:|---:|---:|---:|"]
    for op, kernel, case in dict.fromkeys((r.op, r.kernel, r.case) for r in rows):
        mine = [r for r in rows if (r.op, r.kernel, r.case) == (op, kernel, case)]
        if len(mine) > 1:
            clean = [r for r in mine if r.ok and not r.spill_bytes]
            on_wgmma = f"{sum(r.wgmma > 0 for r in clean)}" if any(r.tensor_cores for r in mine) else "no MMA"
            lines.append(f"| {op} | {kernel} | {case} | {len(clean)}/{len(mine)} | {on_wgmma} "
                         f"| {min(r.registers for r in mine)} | {max(r.shared_bytes for r in mine) / 1024:.0f} |")
    lines += ["", "## Every config", "",
             "| op | case | kernel | config | regs | stack B | shared KiB | tile buffers | tensor cores (SASS count) "
             "| compile s | problem |",
             "|---|---|---|---|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        cores = ", ".join(f"{name} {count}" for name, count in (("HGMMA", r.wgmma), ("HMMA", r.mma)) if count)
        lines.append(f"| {r.op} | {r.case} | {r.kernel} | {r.config} | {r.registers} | {r.spill_bytes} "
                     f"| {r.shared_bytes / 1024:.1f} | {r.buffers or ''} | {cores} | {r.seconds} "
                     f"| {r.problem or ('spills' if r.spill_bytes else '')} |")
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps({"arch": arch, "command": command, "versions": versions,
                                                     "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(LIMITS))
    parser.add_argument("--ops", nargs="+", default=["attention", "rmsnorm", "swiglu", "rope", "projector",
                                                    "linear_cross_entropy"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128, 32, 96])
    parser.add_argument("--quick", action="store_true", help="only the first surviving config of each launch")
    parser.add_argument("--warm-cache", action="store_true", help="use Triton's cache (compile times then mean little)")
    parser.add_argument("--out", type=Path, help="report path (.md, with a .json beside it); default: none")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("run with TRITON_INTERPRET=0: the interpreter's kernels cannot be compiled")
    if args.out:  # before minutes of compiling, not after
        args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.warm_cache:  # compile times from Triton's cache would be ~0; compile into a fresh one
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-compile-")
    by_name = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    launches: list[Launch] = []
    for driver in cases(args.ops, [by_name[d] for d in args.dtypes], args.head_dims):
        driver(launches)
    seen, rows = set(), []
    work = [(launch, config) for launch in launches
            for config in (_configs(launch)[:1] if args.quick else _configs(launch))]
    for launch, config in tqdm(work, desc=f"compile sm_{args.arch}", unit="config"):
        key = (launch.op, launch.case, kernel_label(launch), repr(config))
        if key in seen:
            continue
        seen.add(key)
        rows.append(compile_launch(launch, config, args.arch))
    bad = [r for r in rows if not r.ok]
    spilled = [r for r in rows if r.ok and r.spill_bytes]
    for r in rows:
        flag = "FAIL " if not r.ok else "spill" if r.spill_bytes else "ok   "
        print(f"{flag} {r.op:<20} {r.case:<18} {r.kernel:<20} {r.config:<44} regs {r.registers:3d} "
              f"stack {r.spill_bytes:5d} B  shared {r.shared_bytes / 1024:6.1f} KiB  {r.tensor_cores or '-':<5} "
              f"{r.problem}")
    print(f"{len(rows)} configs for sm_{args.arch}: {len(rows) - len(bad)} fit, {len(bad)} do not, "
          f"{len(spilled)} spill, {sum(bool(r.mma) for r in rows)} use mma.sync (HMMA)")
    if args.out:
        write_report(rows, args.arch, "TRITON_INTERPRET=0 python benchmarks/triton_compile.py "
                     + " ".join(argv if argv is not None else sys.argv[1:]), args.out)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
