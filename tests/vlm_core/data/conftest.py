"""Fixtures of the data tests: a tiny tokenizer trained on synthetic sentences, and tiny PNGs."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from vlm_core.data.tokenizer import load_tokenizer, train_tokenizer

COLORS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle", "star")
WORDS = ("CAT", "DOG", "SUN", "BOX", "CUP")


def synthetic_corpus(count: int = 400, seed: int = 0) -> list[str]:
    """Questions and answers in the style of the built-in world, with numbers and upper-case words."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        color, shape, word = rng.choice(COLORS), rng.choice(SHAPES), rng.choice(WORDS)
        number = rng.randint(0, 120)
        texts.append(
            rng.choice(
                (
                    f"How many {color} {shape}s are there?",
                    f"There are {number} {color} {shape}s.",
                    f"What word is written in the image? {word}",
                    f"Is there a {color} {shape} left of the {shape}? Yes.",
                    f"The {shape} is {color}, and the word reads {word}.",
                )
            )
        )
    return texts


@pytest.fixture(scope="session")
def make_corpus() -> Callable[..., list[str]]:
    """``make_corpus(count, seed)``: the synthetic sentences, for tests that train their own tokenizer."""
    return synthetic_corpus


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Trained once per session (~0.5 s); tests load their own copy so that none can alter another's.
    return train_tokenizer(synthetic_corpus(), tmp_path_factory.mktemp("tokenizer") / "tok", vocab_size=512)


@pytest.fixture
def tokenizer(tokenizer_dir: Path):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture
def write_png() -> Callable[..., Path]:
    """``write_png(path, size=16, color=(255, 0, 0))`` writes a solid-colour PNG and returns its path."""

    def write(path: Path, size: int | tuple[int, int] = 16, color: tuple[int, int, int] = (255, 0, 0)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        dims = (size, size) if isinstance(size, int) else size
        Image.new("RGB", dims, color).save(path, format="PNG")
        return path

    return write
