"""Image files → :class:`ImageFacts` (size, pixel hash, perceptual hash, statistics, thumbnail); the I/O edge.

Every image is read once, at ingest. The pixel count is taken from the file header *before* anything is
decoded, so a decompression bomb (a small file that decodes to billions of pixels) is refused by
``validate.max_pixels`` and never reaches the decoder; PIL's own bomb limit is not relied on.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from curation.records import THUMB, ImageFacts
from vlm_core.data.errors import DataError
from vlm_core.data.image import PIL_DECODE_ERRORS

__all__ = ["ImageInspector", "header_size", "image_facts"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` read from the header of a PNG, JPEG, GIF, BMP or WebP file; None for other formats.

    Raises ``DataError`` when the header of a recognised format is cut short or malformed.
    """
    try:
        if data.startswith(_PNG_SIGNATURE):
            if data[12:16] != b"IHDR":
                raise DataError("PNG without an IHDR chunk first (corrupt header)")
            return struct.unpack(">II", data[16:24])
        if data.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data.startswith(b"BM"):
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
    except struct.error:
        raise DataError("header cut short (truncated file)") from None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int]:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise DataError(f"JPEG marker expected at byte {position} (corrupt header)")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return width, height
        position += 2 + length
    raise DataError("JPEG without a start-of-frame header (truncated or corrupt)")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    raise DataError(f"WebP with an unknown first chunk {chunk!r}")


def color_phash(image: Image.Image) -> tuple[int, int, int]:
    """The 64-bit pHash of each of the R, G and B channels.

    The grey-level pHash alone is blind to hue: on the dirty world, 0.1% of distinct clean pairs with the
    same text had identical grey pHashes (shapes of equal luminance in another colour), against 0.02%
    within 6 bits for the three channels together.
    """
    return tuple(int(str(imagehash.phash(channel)), 16) for channel in image.split())  # type: ignore[return-value]


def image_facts(data: bytes, max_pixels: int, content_sha: str | None = None) -> ImageFacts:
    """Decode ``data`` (the bytes of one image file) and measure it; raises ``DataError`` with the reason.

    ``content_sha`` is the sha256 of ``data`` when the caller has it already (computed here otherwise).
    Order of checks: empty file; header size against ``max_pixels`` (no decoding yet); a full decode,
    which catches truncated and corrupt files that PIL's ``verify`` lets through.
    """
    if not data:
        raise DataError("is an empty file (0 bytes)")
    size = header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise DataError(
            f"is a decompression bomb: its header says {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, "
            f"more than validate.max_pixels={max_pixels:,} (refused before decoding)"
        )
    try:
        with warnings.catch_warnings():
            # Formats without a header reader above fall back on PIL, whose bomb warning becomes an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise DataError(
                        f"is a decompression bomb: {width}x{height} = {width * height:,} pixels, more than "
                        f"validate.max_pixels={max_pixels:,} (refused before decoding)"
                    )
                # verify() checks every PNG chunk's CRC, which a full decode of a damaged IDAT may not notice.
                image.verify()
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")  # the full decode: truncated data fails here
    except (*PIL_DECODE_ERRORS, Image.DecompressionBombWarning) as exc:
        raise DataError(f"is not a readable image ({type(exc).__name__}: {exc})") from None
    pixels = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
    digest = hashlib.sha256(f"{width}x{height}:".encode())
    digest.update(pixels.tobytes())
    thumb = np.asarray(rgb.resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.uint8)  # [THUMB, THUMB, 3]
    return ImageFacts(
        width=width,
        height=height,
        pixel_sha=digest.hexdigest(),
        content_sha=content_sha or hashlib.sha256(data).hexdigest(),
        phash=color_phash(rgb),
        mean=float(pixels.mean()),
        std=float(np.sqrt(pixels.reshape(-1, 3).astype(np.float64).var(axis=0).mean())),
        thumb=thumb,
    )


class ImageInspector:
    """Reads image files for the validator and remembers the facts of each path, cached by content hash.

    Use ``inspector.check`` as the loader's ``check_image``: it raises ``DataError`` for a bad image and
    records the facts of a good one, so that every image is decoded once per run (and not at all when
    its bytes were seen by an earlier run).
    """

    def __init__(self, max_pixels: int, cache: dict[str, ImageFacts] | None = None) -> None:
        self.max_pixels = max_pixels
        self.facts: dict[Path, ImageFacts] = {}
        self.cache = cache if cache is not None else {}
        self.new: dict[str, ImageFacts] = {}  # content hash → facts measured in this run (for the caller to store)

    def check(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot be read ({type(exc).__name__}: {exc})") from None
        key = hashlib.sha256(data).hexdigest()
        facts = self.cache.get(key)
        if facts is None:
            facts = image_facts(data, self.max_pixels, content_sha=key)
            self.new[key] = facts
            self.cache[key] = facts
        elif facts.width * facts.height > self.max_pixels:
            facts = image_facts(data, self.max_pixels)  # raises: the cap is lower than when it was cached
        self.facts[path] = facts
