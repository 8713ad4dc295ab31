"""Shared fixtures for the curation tests: fresh random generators (seed printed for reproduction)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test; printed so a failure can be replayed (pytest shows captured stdout)."""
    value = int(np.random.SeedSequence().entropy % 2**31)
    print(f"test seed: {value}")
    return value


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
