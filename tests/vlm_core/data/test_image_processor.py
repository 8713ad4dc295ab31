"""ImageProcessor: shape, normalization, resampling filter per direction, and decode errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_core.data.errors import DataError
from vlm_core.data.image import ImageProcessor

BANDS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))


def banded(size: int) -> Image.Image:
    """Four vertical colour bands of size/4 pixels each."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    width = size // 4
    for band, color in enumerate(BANDS):
        pixels[:, band * width : (band + 1) * width] = color
    return Image.fromarray(pixels)


def test_output_shape_dtype_and_normalization(tmp_path: Path, write_png) -> None:
    path = write_png(tmp_path / "solid.png", size=(20, 12), color=(200, 100, 50))
    processor = ImageProcessor(image_size=8, mean=(0.5, 0.4, 0.3), std=(0.25, 0.5, 1.0))
    pixels = processor(path)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    expected = [(200 / 255 - 0.5) / 0.25, (100 / 255 - 0.4) / 0.5, (50 / 255 - 0.3) / 1.0]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(pixels[channel], torch.full((8, 8), value), rtol=0, atol=1e-6)


def test_downscaling_averages_whole_pixels_and_keeps_edges(tmp_path: Path) -> None:
    # 64 -> 48: band edges at 16, 32, 48 source pixels land exactly on 12, 24, 36. BOX keeps every output
    # pixel a pure band colour; bicubic would blend (and overshoot) next to each edge.
    path = tmp_path / "bands.png"
    banded(64).save(path)
    pixels = ImageProcessor(image_size=48, mean=(0, 0, 0), std=(1, 1, 1))(path)  # [3, 48, 48] in [0, 1]
    as_uint8 = torch.round(pixels * 255).to(torch.uint8)
    for band, color in enumerate(BANDS):
        region = as_uint8[:, :, band * 12 : (band + 1) * 12]
        assert torch.equal(region, torch.tensor(color, dtype=torch.uint8).view(3, 1, 1).expand_as(region)), band


def test_upscaling_is_bicubic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8))
    processor = ImageProcessor(image_size=15, mean=(0, 0, 0), std=(1, 1, 1))
    reference = np.asarray(small.resize((15, 15), Image.Resampling.BICUBIC), dtype=np.float32) / 255  # [S, S, 3]
    torch.testing.assert_close(processor.from_pil(small), torch.from_numpy(reference).permute(2, 0, 1), rtol=0, atol=1e-6)


def test_from_pil_matches_file_and_converts_modes(tmp_path: Path) -> None:
    processor = ImageProcessor(image_size=16)
    image = banded(32)
    path = tmp_path / "bands.png"
    image.save(path)
    assert torch.equal(processor(path), processor.from_pil(image))
    gray = processor.from_pil(Image.new("L", (16, 16), 128))
    rgba = processor.from_pil(Image.new("RGBA", (16, 16), (255, 0, 0, 10)))
    assert gray.shape == rgba.shape == (3, 16, 16)
    assert torch.equal(gray[0], gray[2])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_undecodable_file_raises_data_error_naming_it(tmp_path: Path, damage: str) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(good)
    broken = tmp_path / f"{damage}.png"
    broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2] if damage == "truncated" else b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot decode image") as raised:
        ImageProcessor(image_size=16)(broken)
    assert str(broken) in str(raised.value)


def test_missing_file_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as raised:
        ImageProcessor(image_size=16)(tmp_path / "gone.png")
    assert str(tmp_path / "gone.png") in str(raised.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"image_size": 0}, "image_size=0"), ({"image_size": 8, "std": (1, 0, 1)}, "std="), ({"image_size": 8, "mean": (0.5,)}, "one value per RGB")],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageProcessor(**kwargs)
