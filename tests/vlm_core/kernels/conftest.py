"""The fixture every fused-kernel test uses to run Triton: compiled on a GPU, the interpreter otherwise."""

from __future__ import annotations

import pytest
from kernel_checks import CUDA, DEVICE, HAS_TRITON, import_triton_for_the_interpreter

from vlm_core.kernels.triton_runtime import triton_status

import_triton_for_the_interpreter()


@pytest.fixture
def triton_kernels(monkeypatch):
    """Make the Triton kernels runnable here (the interpreter without a GPU), or skip saying why."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, reason = triton_status(DEVICE)
    if not ok:
        pytest.skip(reason)
