"""Which calls of the compiled extension crash the process, and with which toolchain it was built.

On the H100 image (2026-11-24) the extension's CPU ops segfaulted in test_ext.py after its first tests had
passed; the tests that crashed are the ones that reach an error path, where the op throws a C++ exception
(TORCH_CHECK_VALUE). A process that crashes in the unwinder when *any* C++ exception is thrown looks the same
(pytorch/pytorch#117597 is one such report), so this probe tells the cases apart, each in a process of its
own: a valid call of our op; a call of ours that must raise ValueError; and an error thrown by libtorch
itself. It also prints the compiler that torch.utils.cpp_extension uses and the C++ runtimes the built
library links. Run from the repo root after `python setup.py build_ext --inplace`:

    python scripts/ext_probe.py          # exit 0 when every probe behaved, 1 otherwise
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD = "import torch, vlm_core.kernels.ext as ext; assert ext.load_extension()[0], ext.load_extension()[1]\n"
PROBES = {
    # name: (code, what a healthy process prints last)
    "our op, valid input": (LOAD + "ids = torch.tensor([5, 3, 3, 6]); print(ext.packed_metadata(ids, "
                            "torch.tensor([4]), 3, 2, impl='extension')[2].tolist())", "[0, 1, 1, 0]"),
    "our op, error path": (LOAD + "try:\n    ext.packed_metadata(torch.tensor([5, 6]), torch.tensor([-1, 3]), 3, 2, "
                           "impl='extension')\nexcept ValueError as e:\n    print('ValueError')", "ValueError"),
    "libtorch's own error": ("import torch\ntry:\n    torch.zeros(2) + torch.zeros(3)\nexcept RuntimeError:\n"
                             "    print('RuntimeError')", "RuntimeError"),
}  # fmt: skip


def toolchain() -> list[str]:
    lines = [f"CXX={os.environ.get('CXX', '(unset)')}"]
    compiler = os.environ.get("CXX") or shutil.which("c++") or "c++"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        lines.append(f"{compiler}: {version.splitlines()[0]}")
    except (OSError, subprocess.CalledProcessError) as error:
        lines.append(f"{compiler}: not runnable ({error})")
    library = next(iter((ROOT / "vlm_core").glob("_ext*.so")), None)
    if library is None:
        return lines + ["vlm_core/_ext*.so: not built"]
    if shutil.which("ldd"):
        linked = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=False).stdout
        lines += [f"  {line.strip()}" for line in linked.splitlines() if "libstdc++" in line or "libgcc" in line]
    return lines


def main() -> int:
    print("\n".join(toolchain()))
    healthy = True
    for name, (code, expected) in PROBES.items():
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
        last = (result.stdout.strip().splitlines() or [""])[-1]
        ok = result.returncode == 0 and last == expected
        healthy &= ok
        detail = f"exit {result.returncode}" + ("" if result.returncode >= 0 else f" (signal {-result.returncode})")
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}, printed {last!r}, expected {expected!r}")
        if not ok and result.stderr:
            print("     " + result.stderr.strip().splitlines()[-1])
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
