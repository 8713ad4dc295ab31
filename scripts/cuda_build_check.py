"""Compile and link csrc/'s CUDA build on a machine without a GPU or a CUDA toolkit.

setup.py builds the CUDA part of ``vlm_core._ext`` only where torch is a CUDA build and nvcc is found,
so on a CPU machine (and in CI) ``csrc/vlm_ext_cuda.cu`` would otherwise never be compiled. This script
fetches what the build needs from PyPI into a cache folder, and nothing else:

- NVIDIA's CUDA compiler wheels (``nvidia-cuda-nvcc``, ``-crt``, ``nvvm``, ``-runtime``, ``-cccl``), about
  200 MB, no driver and no libraries beyond cudart;
- the headers of the CUDA build of the venv's torch version (the ``torch`` wheel on PyPI, of which only
  ``torch/include`` is extracted).

Then it compiles ``vlm_ext_cuda.cu`` with nvcc for each ``--arch`` (flags as torch.utils.cpp_extension
gives them) and ``vlm_ext.cpp`` with ``VLM_EXT_WITH_CUDA`` defined, links both into one shared library,
and fails if the library leaves any ``vlm_ext::`` symbol undefined (a declaration in one file that the
other does not define with the same signature). It prints ptxas's registers and spills per kernel, and
the widest global load and store in each kernel's SASS; the 16-byte row copies must move 128 bits per
access (LDG.E.128/STG.E.128).
It does not run anything: running the CUDA ops needs a GPU (tests/vlm_core/kernels/test_ext.py).

    python scripts/cuda_build_check.py                   # sm_80 and sm_90, cache under ~/.cache
    python scripts/cuda_build_check.py --arch 90 100 --json out.json
    python scripts/cuda_build_check.py --cuda-home /usr/local/cuda --torch-include <torch>/include
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
DEFAULT_CACHE = Path.home() / ".cache" / "vlm-data-metabolism" / "cuda-build-check"
CUDA_PACKAGES = ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-runtime", "nvidia-cuda-cccl")


@dataclass
class KernelResources:
    """ptxas's report for one kernel on one architecture."""

    kernel: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    load_bits: int = 0  # the widest global load in the kernel's SASS (LDG.E.128 = 128); 0 = SASS not read
    store_bits: int = 0  # the widest global store (STG)


@dataclass
class Report:
    ok: bool
    nvcc: str = ""
    torch_headers: str = ""
    archs: list[str] = field(default_factory=list)
    kernels: list[KernelResources] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    undefined: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    error: str = ""


_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
_FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")
_REGS = re.compile(r"Used (?P<regs>\d+) registers")


def parse_ptxas(text: str) -> list[KernelResources]:
    """Per-kernel registers and spills from ``nvcc -Xptxas -v`` output (mangled names kept as ptxas prints them)."""
    out: list[KernelResources] = []
    current: dict | None = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = {"kernel": m["name"], "arch": m["arch"]}
        elif current is not None and (m := _FRAME.search(line)):
            current.update(stack_bytes=int(m["stack"]), spill_stores=int(m["stores"]), spill_loads=int(m["loads"]))
        elif current is not None and (m := _REGS.search(line)):
            if "stack_bytes" not in current:
                raise ValueError(f"ptxas output: no stack/spill line before the register line of {current['kernel']}")
            out.append(KernelResources(registers=int(m["regs"]), **current))
            current = None
    return out


_SASS_ARCH = re.compile(r"^\s*arch = (sm_\d+a?)")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_SASS_GLOBAL = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)")
_ACCESS_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def global_access_bits(sass: str) -> dict[tuple[str, str], tuple[int, int]]:
    """Per (arch, mangled kernel name) of ``cuobjdump --dump-sass`` output: the widest global load and store
    in bits (an unsized LDG/STG moves 32)."""
    widest: dict[tuple[str, str], list[int]] = {}
    arch = function = None
    for line in sass.splitlines():
        if m := _SASS_ARCH.match(line):
            arch = m[1]
        elif m := _SASS_FUNCTION.match(line):
            function = m[1]
            widest[(arch, function)] = [0, 0]
        elif function is not None:
            for op, modifiers in _SASS_GLOBAL.findall(line):
                bits = next((_ACCESS_BITS[x] for x in modifiers.split(".") if x in _ACCESS_BITS), 32)
                slot = widest[(arch, function)]
                slot[op == "STG"] = max(slot[op == "STG"], bits)
    return {key: (load, store) for key, (load, store) in widest.items()}


def short_kernel_names(kernels: list[KernelResources]) -> None:
    """Demangle the kernels' names in place (``c++filt``), dropping the anonymous namespace and the parameters."""
    if not kernels or shutil.which("c++filt") is None:
        return
    names = _run(["c++filt"], "c++filt", stdin="\n".join(k.kernel for k in kernels)).splitlines()
    for k, name in zip(kernels, names):
        name = name.replace("(anonymous namespace)::", "")
        k.kernel = name.split("(")[0].removeprefix("void ")


def undefined_own_symbols(nm_output: str, namespace: str = "vlm_ext::") -> list[str]:
    """The demangled undefined symbols (``nm -C --undefined-only``) that belong to our own namespace."""
    return sorted({line.split(maxsplit=1)[-1].strip() for line in nm_output.splitlines() if namespace in line})


def our_warnings(compiler_output: str, source_dir: str) -> list[str]:
    """Compiler warnings located in ``source_dir`` (warnings in torch's or CUDA's headers are not ours to fix)."""
    return [line.strip() for line in compiler_output.splitlines() if "warning" in line and source_dir in line]


class FetchError(RuntimeError):
    """The toolchain or torch's headers could not be fetched (no index, no network): nothing was compiled."""


def _run(cmd: list[str], what: str, env: dict | None = None, stdin: str | None = None,
         error: type[RuntimeError] = RuntimeError) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, input=stdin)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise error(f"{what} failed (exit {proc.returncode}):\n$ {' '.join(cmd)}\n{output[-6000:]}")
    return output


def _pip_env() -> dict:
    # The dev machine's pip config points at local CPU wheels; the CUDA wheels must come from the index.
    env = dict(os.environ)
    env.pop("PIP_FIND_LINKS", None)
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def fetch_cuda(cache: Path, cuda: str, index_url: str) -> Path:
    """CUDA_HOME of the compiler wheels for ``cuda`` (major.minor), installed into ``cache`` once."""
    major = cuda.split(".")[0]
    target = cache / f"cuda-{cuda}"
    home = target / "nvidia" / f"cu{major}"
    if not (home / "bin" / "nvcc").exists():
        shutil.rmtree(target, ignore_errors=True)
        pins = [f"{name}=={cuda}.*" for name in CUDA_PACKAGES]
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:", "--target",
              str(target), "--index-url", index_url, *pins], f"pip install of {' '.join(pins)}", _pip_env(),
             error=FetchError)
    if not (home / "bin" / "nvcc").exists():
        raise FetchError(f"{home}/bin/nvcc missing after installing {CUDA_PACKAGES} {cuda}: these wheels do not "
                         "ship nvcc (CUDA 12's ship only ptxas; use --cuda 13.0 or --cuda-home)")
    return home


def fetch_torch_headers(cache: Path, version: str, index_url: str) -> tuple[Path, str]:
    """``torch/include`` of PyPI's ``torch==version`` wheel for this Python, and the CUDA version it was built with."""
    target = cache / f"torch-{version}-{sys.implementation.cache_tag}"
    include, stamp = target / "torch" / "include", target / "cuda.txt"
    if not stamp.exists():
        shutil.rmtree(target, ignore_errors=True)
        wheels = target / "wheel"
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest",
              str(wheels), "--index-url", index_url, f"torch=={version}"], f"pip download of torch=={version}",
             _pip_env(), error=FetchError)
        (wheel,) = wheels.glob("torch-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.startswith("torch/include/")]
            zf.extractall(target, members)
            found = re.search(r"^cuda: .*?= '([^']+)'", zf.read("torch/version.py").decode(), re.M)
        shutil.rmtree(wheels)
        if not found:
            raise RuntimeError(f"{wheel.name} on {index_url} is not a CUDA build of torch (torch.version.cuda is None)")
        stamp.write_text(found[1])
    return include, stamp.read_text().strip()


def check(cuda_home: Path, torch_include: Path, archs: list[str], build: Path, csrc: Path = CSRC) -> Report:
    """Compile ``csrc``'s two sources, link them, and look for our own undefined symbols."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    import torch

    report = Report(ok=False, archs=[f"sm_{a}" for a in archs], torch_headers=str(torch_include))
    build.mkdir(parents=True, exist_ok=True)
    nvcc = cuda_home / "bin" / "nvcc"
    report.nvcc = _run([str(nvcc), "--version"], "nvcc --version").strip().splitlines()[-1]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    common = [f"-I{torch_include}", f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}",
              f"-I{cuda_home / 'include'}", "-DVLM_EXT_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_ext",
              "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-std=c++20", "-O3"]
    gencode = [flag for a in archs for flag in ("-gencode", f"arch=compute_{a},code=sm_{a}")]

    start = time.perf_counter()
    cu_out = _run([str(nvcc), "-c", str(csrc / "vlm_ext_cuda.cu"), "-o", str(build / "vlm_ext_cuda.o"), *common,
                   *COMMON_NVCC_FLAGS, *gencode, "-Xcompiler", "-fPIC", "-Xptxas", "-v"], "nvcc vlm_ext_cuda.cu")
    report.seconds["nvcc"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    cpp_out = _run(["c++", "-c", str(csrc / "vlm_ext.cpp"), "-o", str(build / "vlm_ext.o"), *common,
                    f"-I{sysconfig.get_paths()['include']}", "-fPIC", "-Wall"], "c++ vlm_ext.cpp")
    report.seconds["c++"] = round(time.perf_counter() - start, 1)
    library = build / "_ext_cuda.so"
    _run(["c++", "-shared", str(build / "vlm_ext.o"), str(build / "vlm_ext_cuda.o"), "-o", str(library)], "link")

    report.kernels = parse_ptxas(cu_out)
    cuobjdump = _cuobjdump(cuda_home)
    if cuobjdump is not None:
        widths = global_access_bits(_run([str(cuobjdump), "--dump-sass", str(build / "vlm_ext_cuda.o")], "cuobjdump"))
        for k in report.kernels:
            k.load_bits, k.store_bits = widths.get((k.arch, k.kernel), (0, 0))
    # the 16-byte row copies, picked by their mangled names (demangling needs c++filt, which may be absent)
    vector16 = [k for k in report.kernels if "copy_rows_kernelI5uint4" in k.kernel]
    short_kernel_names(report.kernels)
    narrow = [f"{k.arch} {k.kernel}" for k in vector16 if (k.load_bits, k.store_bits) != (128, 128)]
    report.warnings = our_warnings(cu_out + cpp_out, str(csrc))
    report.undefined = undefined_own_symbols(_run(["nm", "-C", "--undefined-only", str(library)], "nm"))
    if not report.kernels or {k.arch for k in report.kernels} != set(report.archs):
        report.error = f"ptxas reported kernels for {sorted({k.arch for k in report.kernels})}, expected {report.archs}"
    elif report.undefined:
        report.error = f"{len(report.undefined)} vlm_ext symbols are declared but not defined: {report.undefined}"
    elif report.warnings:
        report.error = f"{len(report.warnings)} compiler warnings in {csrc}"
    elif cuobjdump is not None and narrow:
        report.error = f"the 16-byte row copies do not move 128 bits per access in SASS: {narrow}"
    report.ok = not report.error
    return report


def _cuobjdump(cuda_home: Path) -> Path | None:
    """The toolkit's cuobjdump, else the one Triton ships (the compiler wheels have none), else None."""
    if (cuda_home / "bin" / "cuobjdump").is_file():
        return cuda_home / "bin" / "cuobjdump"
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return bundled if bundled.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90"], help="compute capabilities (80 A100, 90 H100/H200)")
    parser.add_argument("--cuda", default="13.0", help="CUDA version of the compiler wheels (13.x ship nvcc)")
    parser.add_argument("--cuda-home", type=Path, help="an installed toolkit instead of the wheels")
    parser.add_argument("--torch-include", type=Path, help="a CUDA torch's include folder instead of PyPI's wheel")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--index-url", default="https://pypi.org/simple")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    bad = [a for a in args.arch if not re.fullmatch(r"\d{2,3}a?", a)]
    if bad:
        parser.error(f"--arch takes compute capabilities like 80 or 90a, got {bad}")

    import torch

    version = torch.__version__.split("+")[0]
    try:
        cuda_home = args.cuda_home or fetch_cuda(args.cache, args.cuda, args.index_url)
        if args.torch_include:
            torch_include, torch_cuda = args.torch_include, "given"
        else:
            torch_include, torch_cuda = fetch_torch_headers(args.cache, version, args.index_url)
        report = check(cuda_home, torch_include, args.arch, args.cache / "build")
    except (RuntimeError, OSError, ValueError) as error:
        report = Report(ok=False, error=str(error))
        torch_cuda = "?"

    print(f"cuda build check: {platform.machine()}, torch {version} headers (CUDA {torch_cuda}), {report.nvcc}")
    for k in report.kernels:
        access = f"{k.load_bits:3d}/{k.store_bits:3d}-bit loads/stores" if k.load_bits else "SASS not read"
        print(f"  {k.arch}  {k.registers:3d} registers  {k.spill_stores + k.spill_loads:4d} B spilled  {access}  "
              f"{k.kernel}")
    for line in report.warnings:
        print(f"  warning: {line}")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    print("OK: compiled and linked, no undefined vlm_ext symbols" if report.ok else f"FAILED: {report.error}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
