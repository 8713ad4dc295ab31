"""Without a GPU, the tests run the Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET=1 is set here, before any test module is collected (setdefault keeps a value the
caller set). With triton 3.7 the
interpreter only works if triton is imported after the variable is set, so the fixture below
reports whether something imported triton before this file ran (a plugin, say).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

_IMPORTED_TOO_EARLY = False
if not torch.cuda.is_available():
    _IMPORTED_TOO_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def triton_interpreter_problem() -> str:
    """Why Triton's interpreter cannot be trusted in this session, or "" if it can."""
    if _IMPORTED_TOO_EARLY:
        return (
            "triton was imported (by a test module collected earlier) before TRITON_INTERPRET=1 was set, "
            "and its interpreter then fails; run with TRITON_INTERPRET=1 in the environment"
        )
    return ""
