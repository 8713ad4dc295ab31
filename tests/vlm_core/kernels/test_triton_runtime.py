"""VLM_TRITON_AUTOTUNE: the autotuned kernels time every config they keep, or only the first when asked."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import HAS_TRITON

from vlm_core.kernels import fused_projector_kernels, packed_attention_kernels
from vlm_core.kernels.triton_runtime import AUTOTUNE_ENV, autotune_candidates

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def test_all_configs_unless_first_is_asked(monkeypatch):
    monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    assert autotune_candidates(["a", "b", "c"]) == ["a", "b", "c"]
    monkeypatch.setenv(AUTOTUNE_ENV, "first")
    assert autotune_candidates(["a", "b", "c"]) == ["a"]
    assert autotune_candidates([]) == []


def test_an_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(AUTOTUNE_ENV, "fastest")
    with pytest.raises(ValueError, match="VLM_TRITON_AUTOTUNE='fastest'; expected 'all'"):
        autotune_candidates(["a"])


def _gpu_tuners():
    """(name, autotuner, its named args, its constexpr kwargs) of every autotuned GPU launch family."""
    attention = packed_attention_kernels._kernels(False)  # the GPU mode's autotuners (not launched here)
    projector = fused_projector_kernels._kernels(False)
    half = {"Q": torch.empty(1, dtype=torch.bfloat16)}
    return [
        ("attention forward", attention.forward, half, {"BLOCK_D": 128}),
        ("attention dq", attention.dq, half, {"BLOCK_D": 128}),
        ("attention dkdv", attention.dkdv, half, {"BLOCK_D": 128}),
        ("projector matmul", projector.matmul, {}, {"DOT_PRECISION": "tf32"}),
    ]


@pytest.mark.parametrize("index", range(4), ids=["forward", "dq", "dkdv", "matmul"])
def test_every_autotuned_kernel_narrows_to_its_first_config(monkeypatch, index):
    name, tuner, named, kwargs = _gpu_tuners()[index]
    monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    kept = tuner.early_config_prune(tuner.configs, named, **kwargs)
    assert len(kept) > 1, f"{name}: expected several configs to time, kept {len(kept)}"
    monkeypatch.setenv(AUTOTUNE_ENV, "first")
    assert tuner.early_config_prune(tuner.configs, named, **kwargs) == kept[:1], name
