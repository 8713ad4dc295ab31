"""Helpers of the curation tests: tiny images and records with planted defects, written into tmp dirs."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def scene_pixels(seed: int, size: int = 32) -> np.ndarray:
    """A dark image with a few random coloured rectangles: distinct seeds give clearly different pictures."""
    rng = np.random.default_rng(seed)
    pixels = np.full((size, size, 3), 24, dtype=np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, size - 8, size=2)
        w, h = rng.integers(4, 9, size=2)
        pixels[y : y + h, x : x + w] = rng.integers(40, 256, size=3)
    return pixels


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(pixels))
    return path


def bomb_png(side: int = 20_000) -> bytes:
    """A valid PNG header claiming side x side pixels (1-bit), with a tiny IDAT: refused from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * (1 + side // 8) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def record(record_id: str, image: str | list[str] | None, question: str = "What is in the image?",
           answer: str = "Two boxes.", skill: str | None = None) -> dict[str, Any]:
    value = f"<image>\n{question}" if image is not None else question
    out: dict[str, Any] = {"id": record_id, "conversations": [{"from": "human", "value": value},
                                                              {"from": "gpt", "value": answer}]}
    if image is not None:
        out["image"] = image
    if skill is not None:
        out["skill"] = skill
    return out


def write_jsonl(path: Path, lines: list[dict[str, Any] | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines) + b"\n")
    return path
