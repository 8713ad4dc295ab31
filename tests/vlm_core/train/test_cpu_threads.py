"""train.tower.threads: stage 0 runs on its own CPU thread count, and the job's setting comes back after."""

from __future__ import annotations

import pytest
import torch

from vlm_core.train.job import cpu_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_sets_then_restores(two_threads: None) -> None:
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_none_leaves_the_setting_alone(two_threads: None) -> None:
    with cpu_threads(None):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


def test_restores_after_an_error(two_threads: None) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
