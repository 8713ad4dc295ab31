"""ShareGPT/messages and WebDataset sources go through the LLaVA checks; their own bad inputs are quarantined."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from planted_data import png_bytes, scene_pixels, write_jsonl, write_png

from curation.config import CurateConfig, SourceConfig
from curation.ingest import ingest
from curation.sources.sharegpt import to_llava_record, translate_reason


def _cfg(tmp_path: Path, **source) -> CurateConfig:
    return CurateConfig(sources={"s": SourceConfig(**source)}, cache_dir=str(tmp_path / "cache"), show_progress=False)


def test_sharegpt_messages_become_samples_and_reasons_use_its_field_names(tmp_path: Path) -> None:
    write_png(tmp_path / "img" / "a.png", scene_pixels(0))
    lines = [
        {"id": "parts", "images": ["a.png"], "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "Boxes."}]},
        {"id": "string", "images": ["a.png"], "messages": [{"role": "user", "content": "<image>Colour?"},
                                                           {"role": "assistant", "content": "Red."}]},
        {"id": "bad-role", "images": ["a.png"], "messages": [{"role": "user", "content": "<image>Hi"},
                                                             {"role": "bot", "content": "Hello."}]},
        {"id": "empty", "images": ["a.png"], "messages": [{"role": "user", "content": "<image>Hi"},
                                                          {"role": "assistant", "content": " "}]},
        {"id": "count", "images": ["a.png", "a.png"], "messages": [{"role": "user", "content": "<image>Hi"},
                                                                   {"role": "assistant", "content": "Yes."}]},
        {"id": "no-messages", "images": ["a.png"]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", lines)
    [source] = ingest(_cfg(tmp_path, kind="sharegpt", path=str(path), image_root=str(tmp_path / "img")))
    samples = {item.sample.id: item.sample for item in source.items}
    assert set(samples) == {"parts", "string"}
    assert samples["parts"].turns[0].text == "<image>\nWhat is this?" and samples["parts"].meta["system"] == "Be brief."
    reasons = {q.record: q.reason for q in source.quarantined}
    assert reasons["bad-role"].startswith("messages[1].role: unknown role 'bot'")
    assert reasons["empty"].startswith("messages[1].content: empty")
    assert reasons["count"].startswith("messages: 1 <image> placeholder(s)") and "'images' lists 2" in reasons["count"]
    assert reasons["no-messages"].startswith("messages: missing")


def test_translate_reason_and_conversion_roundtrip() -> None:
    assert translate_reason("conversations[3].from: x") == "messages[3].role: x"
    assert translate_reason("image[1]: 'a' not found") == "images[1]: 'a' not found"
    converted = to_llava_record({"id": 1, "messages": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})
    assert converted["conversations"] == [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]


def _add(archive: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_webdataset_shard_samples_and_unsafe_members(tmp_path: Path) -> None:
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as archive:
        _add(archive, "s/0001.png", png_bytes(scene_pixels(1)))
        _add(archive, "s/0001.txt", b"Two red boxes.")
        _add(archive, "s/0002.jpg", png_bytes(scene_pixels(2)))  # content sniffed, name only groups
        _add(archive, "s/0002.json", json.dumps({"conversations": [
            {"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "Three."}]}).encode())
        _add(archive, "s/0003.png", png_bytes(scene_pixels(3)))
        _add(archive, "s/0003.txt", b"bad \xff byte")
        _add(archive, "../escape.png", png_bytes(scene_pixels(4)))
        _add(archive, "../escape.txt", b"caption")
        _add(archive, "s/0004.png", b"", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(archive, "s/0004.txt", b"caption")
        _add(archive, "s/0005.png", png_bytes(scene_pixels(5)))
    [source] = ingest(_cfg(tmp_path, kind="webdataset", path=str(tmp_path)))
    samples = {item.sample.id: item.sample for item in source.items}
    assert set(samples) == {"s/0001", "s/0002"}
    assert samples["s/0001"].turns[1].text == "Two red boxes."
    assert samples["s/0002"].turns[1].text == "Three."
    assert all(path.is_relative_to((tmp_path / "cache" / "webdataset").resolve()) for path in samples["s/0001"].image_paths)
    reasons = {q.record: q.reason for q in source.quarantined}
    assert reasons["s/0003"].startswith("s/0003.txt: not valid UTF-8")
    assert "climbs out of the shard with '..'" in reasons["../escape"]
    assert "is a link (to '/etc/passwd')" in reasons["s/0004"]
    assert "no .json or .txt member" in reasons["s/0005"]
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "cache" / "escape.png").exists()
    assert source.ingested == 6
