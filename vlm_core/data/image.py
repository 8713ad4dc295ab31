"""Image preprocessing: decode a file, resize it to the vision tower's square input, normalize."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlm_core.data.errors import DataError

# What PIL raises for a file it cannot decode: UnidentifiedImageError and "image file is truncated" are
# OSErrors; some plugins raise SyntaxError or ValueError on malformed headers; DecompressionBombError is
# its own Exception subclass. Anything else is a bug and must not be swallowed.
PIL_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageProcessor:
    """Decodes an image into ``[3, image_size, image_size]`` float32, normalized with ``mean`` and ``std``.

    Resizing ignores the aspect ratio (the world's images are square; squashing keeps every pixel of a
    non-square real image in view). Downscaling uses ``Image.Resampling.BOX``, which averages exactly the
    source pixels each output pixel covers: a 64 → 48 resize maps the world's 3 × 3 cell layout (21.3 px
    cells) onto 16 px cells, aligned with 16 px patches, and a sharp edge at a cell boundary stays sharp
    instead of ringing as with bicubic. Upscaling uses BICUBIC, where BOX would just repeat pixels.

    ``load_uint8`` and ``normalize`` split the work so a dataset can cache resized uint8 images
    (a quarter of the float32 memory) and normalize on access.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size={image_size}; must be a positive number of pixels")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel, got mean={tuple(mean)} std={tuple(std)}")
        if any(value <= 0 for value in std):
            raise ValueError(f"std={tuple(std)} must be positive in every channel (it divides)")
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)  # [3, 1, 1]
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)  # [3, 1, 1]

    def __call__(self, path: Path | str) -> torch.Tensor:
        """``[3, image_size, image_size]`` float32 of the image file at ``path``."""
        return self.normalize(self.load_uint8(path))

    def from_pil(self, image: Image.Image) -> torch.Tensor:
        """``[3, image_size, image_size]`` float32 of an in-memory PIL image."""
        try:
            pixels = self._resized_uint8(image)
        except PIL_DECODE_ERRORS as exc:
            raise DataError(f"in-memory PIL image cannot be decoded: {exc}") from exc
        return self.normalize(pixels)

    def load_uint8(self, path: Path | str) -> torch.Tensor:
        """``[3, image_size, image_size]`` uint8 of the file, resized but not normalized."""
        try:
            with Image.open(path) as image:
                return self._resized_uint8(image)
        except FileNotFoundError as exc:
            raise DataError(f"{path}: image file not found; re-run curation or fix the record's 'image' path") from exc
        except PIL_DECODE_ERRORS as exc:
            raise DataError(
                f"{path}: cannot decode image ({type(exc).__name__}: {exc}); the file is corrupt or truncated: "
                "re-export it, or re-run load_llava, which quarantines records whose images PIL cannot verify"
            ) from exc

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[3, S, S]`` (or ``[N, 3, S, S]``) → float32 ``(pixels / 255 - mean) / std``, same shape."""
        return (pixels.to(torch.float32) / 255.0 - self.mean) / self.std

    def _resized_uint8(self, image: Image.Image) -> torch.Tensor:
        rgb = image.convert("RGB")  # forces the full decode, so truncated data fails here, inside the try
        size = self.image_size
        if rgb.size != (size, size):
            downscale = rgb.width >= size and rgb.height >= size
            resample = Image.Resampling.BOX if downscale else Image.Resampling.BICUBIC
            rgb = rgb.resize((size, size), resample=resample)
        array = np.asarray(rgb, dtype=np.uint8)  # [S, S, 3]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # [3, S, S]
