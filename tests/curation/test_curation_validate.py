"""Ingest: every bad-input class lands in quarantine with a reason naming the field; nothing is lost."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from planted_data import (
    bomb_png,
    png_bytes,
    record,
    scene_pixels,
    write_jsonl,
    write_png,
)

from curation.config import CurateConfig, SourceConfig
from curation.images import ImageInspector, header_size, image_facts
from curation.ingest import ingest
from vlm_core.data.errors import DataError


def _source(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A JSONL source with one good record and one record per bad-input class; returns (file, root, expected)."""
    root = tmp_path / "images"
    write_png(root / "good.png", scene_pixels(0))
    good_bytes = png_bytes(scene_pixels(1))
    (root / "truncated.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    damaged = bytearray(png_bytes(scene_pixels(2)))
    damaged[damaged.index(b"IDAT") + 20] ^= 0xFF
    (root / "bad_crc.png").write_bytes(bytes(damaged))
    (root / "garbage.png").write_bytes(os.urandom(300))
    (root / "empty.png").write_bytes(b"")
    (root / "bomb.png").write_bytes(bomb_png())
    outside = write_png(tmp_path / "outside" / "secret.png", scene_pixels(3))
    os.symlink(outside, root / "link.png")
    lines = [
        record("good", "good.png"),
        {"id": "no-conversations", "image": "good.png"},
        {**record("unknown-role", "good.png"), "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                  {"from": "robot", "value": "Hello."}]},
        {**record("empty-turn", "good.png"), "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                {"from": "gpt", "value": "  "}]},
        record("image-count", "good.png", question="<image> and <image>: which?"),
        record("missing-file", "nowhere.png"),
        record("truncated", "truncated.png"),
        record("bad-crc", "bad_crc.png"),
        record("garbage", "garbage.png"),
        record("empty-file", "empty.png"),
        record("bomb", "bomb.png"),
        record("absolute", str(outside)),
        record("dotdot", "../outside/secret.png"),
        record("symlink", "link.png"),
        record("too-long", "good.png", answer="word " * 5000),
        b'{"id": "bad-json", "image": "good.png", "conversations": [',
        b'{"id": "non-utf8", "image": "good.png", "conversations": [{"from": "human", "value": "<image>\\nbad \xff"},'
        b' {"from": "gpt", "value": "Yes."}]}',
    ]
    expected = {
        "no-conversations": "conversations: missing",
        "unknown-role": "conversations[1].from: unknown role 'robot'",
        "empty-turn": "conversations[1].value: empty",
        "image-count": "conversations: 3 <image> placeholder(s)",
        "missing-file": "image: 'nowhere.png' not found",
        "truncated": "image: 'truncated.png' is not a readable image",
        "bad-crc": "image: 'bad_crc.png' is not a readable image",
        "garbage": "image: 'garbage.png' is not a readable image",
        "empty-file": "image: 'empty.png' is an empty file",
        "bomb": "image: 'bomb.png' is a decompression bomb",
        "absolute": "image: absolute path",
        "dotdot": "image: '../outside/secret.png' resolves to",
        "symlink": "image: 'link.png' resolves to",
        "too-long": "conversations: 25,",
        "#15": "line 16, column",
        "non-utf8": "conversations[0].value: not valid UTF-8",
    }
    return write_jsonl(tmp_path / "data.jsonl", lines), root, expected


def test_every_bad_input_class_is_quarantined_with_its_field(tmp_path: Path) -> None:
    path, root, expected = _source(tmp_path)
    cfg = CurateConfig(sources={"mine": SourceConfig(kind="llava", path=str(path), image_root=str(root))},
                       cache_dir=str(tmp_path / "cache"), show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # the cap, not PIL, must refuse the bomb
        [source] = ingest(cfg)
    assert [item.sample.id for item in source.items] == ["good"]
    reasons = {q.record: q.reason for q in source.quarantined}
    assert set(reasons) == set(expected), sorted(set(reasons) ^ set(expected))
    for label, start in expected.items():
        assert reasons[label].startswith(start), (label, reasons[label])
    assert "refused before decoding" in reasons["bomb"]
    assert all(q.source == str(path) for q in source.quarantined)
    assert source.ingested == len(source.items) + len(source.quarantined) == 17  # nothing silently dropped


def test_non_utf8_record_in_a_json_list_costs_only_that_record(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "a.png", scene_pixels(0))
    good = b'{"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nQ?"}, ' \
           b'{"from": "gpt", "value": "A."}]}'
    bad = good.replace(b'"a"', b'"b"', 1).replace(b"Q?", b"Q\xfe?")
    (tmp_path / "data.json").write_bytes(b"[" + good + b", " + bad + b"]")
    cfg = CurateConfig(sources={"s": SourceConfig(kind="llava", path=str(tmp_path / "data.json"),
                                                  image_root=str(tmp_path / "images"))},
                       cache_dir=str(tmp_path / "cache"), show_progress=False)
    [source] = ingest(cfg)
    assert [item.sample.id for item in source.items] == ["a"]
    assert [(q.record, q.reason.split(":")[0]) for q in source.quarantined] == [("b", "conversations[0].value")]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_header_size_reads_each_format_without_decoding(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (37, 23), (200, 10, 10)).save(buffer, format=fmt)
    assert header_size(buffer.getvalue()) == (37, 23)


def test_pixel_cap_refuses_large_images_from_the_header() -> None:
    data = png_bytes(np.zeros((64, 64, 3), dtype=np.uint8))
    assert image_facts(data, max_pixels=64 * 64).width == 64
    with pytest.raises(DataError, match="decompression bomb: its header says 64x64 = 4,096 pixels"):
        image_facts(data, max_pixels=64 * 64 - 1)


def test_facts_are_cached_by_content_hash(tmp_path: Path) -> None:
    first = write_png(tmp_path / "a.png", scene_pixels(5))
    second = tmp_path / "b.png"
    second.write_bytes(first.read_bytes())
    inspector = ImageInspector(max_pixels=10**6)
    inspector.check(first)
    inspector.check(second)
    assert len(inspector.new) == 1 and inspector.facts[first] == inspector.facts[second]
    # Re-encoding changes the bytes but not the pixels: another content hash, the same pixel hash.
    third = tmp_path / "c.png"
    Image.open(first).save(third, format="PNG", compress_level=9)
    inspector.check(third)
    assert inspector.facts[third].content_sha != inspector.facts[first].content_sha
    assert inspector.facts[third].pixel_sha == inspector.facts[first].pixel_sha
