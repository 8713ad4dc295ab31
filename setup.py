"""Build script. Package metadata lives in pyproject.toml.

The optional compiled extension ``vlm_core._ext`` (csrc/): packed-batch metadata and the projector's
row scatter/gather as torch ops, with C++ CPU twins of every CUDA kernel.

- torch importable (``python setup.py build_ext --inplace``, which ``make setup`` runs in .venv, or
  ``pip install --no-build-isolation -e .``): the CPU part is always built; the CUDA part too when
  torch is a CUDA build and nvcc is found (CUDA_HOME). ``VLM_EXT_CPU_ONLY=1`` skips the CUDA part.
- torch not importable (pip's isolated build environment): no extension; the pure-Python packages
  install and ``vlm_core.kernels.ext`` falls back to the Python references, logging why.
- The extension is ``optional``: a missing or failing compiler is reported as a warning and the build
  goes on without it, so installing never fails for want of a compiler.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup


def extension_build() -> dict:
    """``setup()`` keyword arguments for the extension, or {} when torch cannot be imported here."""
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError as error:
        print(f"setup.py: torch is not importable ({error}); building without vlm_core._ext "
              "(the Python references run instead)", file=sys.stderr)
        return {}
    sources = ["csrc/vlm_ext.cpp"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("VLM_EXT_CPU_ONLY") != "1"
    if with_cuda:
        extension = CUDAExtension(
            "vlm_core._ext", [*sources, "csrc/vlm_ext_cuda.cu"], define_macros=[("VLM_EXT_WITH_CUDA", None)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}, optional=True,
        )  # fmt: skip
    else:
        why = "VLM_EXT_CPU_ONLY=1" if os.environ.get("VLM_EXT_CPU_ONLY") == "1" else (
            "torch is a CPU build" if torch.version.cuda is None else "nvcc was not found (CUDA_HOME unset)")
        print(f"setup.py: building the CPU part of vlm_core._ext only ({why})", file=sys.stderr)
        extension = CppExtension("vlm_core._ext", sources, extra_compile_args=["-O3"], optional=True)
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}}


setup(**extension_build())
