"""SFTDataset: samples become TokenizedSamples, images are decoded once, lengths match the encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlm_core.data.dataset import SFTDataset
from vlm_core.data.errors import DataError
from vlm_core.data.image import ImageProcessor
from vlm_core.data.llava import load_llava
from vlm_core.data.tokenizer import ChatEncoder
from vlm_core.types import Sample, Turn

IMAGE_TOKENS = 4
IMAGE_SIZE = 8


@pytest.fixture
def samples(tmp_path: Path, write_png) -> list[Sample]:
    root = tmp_path / "images"
    write_png(root / "red.png", size=16, color=(255, 0, 0))
    write_png(root / "blue.png", size=16, color=(0, 0, 255))
    records = [
        {"id": "one", "image": "red.png", "conversations": [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Red."}]},
        {
            "id": "two",
            "image": ["blue.png", "red.png"],
            "conversations": [
                {"from": "human", "value": "<image> and <image>: same colour?"},
                {"from": "gpt", "value": "No."},
                {"from": "human", "value": "How many images?"},
                {"from": "gpt", "value": "2"},
            ],
        },
        {"id": "text", "conversations": [{"from": "human", "value": "Count to 3."}, {"from": "gpt", "value": "1 2 3"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    loaded, quarantined = load_llava(tmp_path / "data.json", root)
    assert quarantined == []
    return loaded


def make_dataset(samples: list[Sample], tokenizer, cache_images: bool = True, cache_tokens: bool = True) -> SFTDataset:
    encoder = ChatEncoder(tokenizer, IMAGE_TOKENS)
    return SFTDataset(samples, encoder, ImageProcessor(IMAGE_SIZE), cache_images=cache_images, cache_tokens=cache_tokens)


def test_items_carry_ids_masks_groups_and_images(samples: list[Sample], tokenizer) -> None:
    dataset = make_dataset(samples, tokenizer)
    assert len(dataset) == 3
    two = dataset[1]
    assert two.sample_id == "two"
    assert two.images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and two.images.dtype == torch.float32
    # Image 1 is blue and image 2 red, in placeholder order; normalized with mean = std = 0.5: 1.0 / -1.0.
    assert torch.equal(two.images[0, 2], torch.ones(IMAGE_SIZE, IMAGE_SIZE)) and torch.equal(two.images[0, 0], -torch.ones(IMAGE_SIZE, IMAGE_SIZE))
    assert torch.equal(two.images[1, 0], torch.ones(IMAGE_SIZE, IMAGE_SIZE))
    assert [(two.bidir_group == k).sum().item() for k in (1, 2)] == [IMAGE_TOKENS, IMAGE_TOKENS]
    assert tokenizer.decode(two.input_ids[two.loss_mask]) == "No.</s>2</s>"
    text = dataset[2]
    assert text.images.shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE) and int(text.bidir_group.max()) == 0
    assert (dataset[0].bidir_group == 1).sum() == IMAGE_TOKENS  # the loader's prepended <image>


@pytest.mark.parametrize("cache_tokens", [True, False])
def test_lengths_equal_encoded_lengths_without_decoding_images(
    samples: list[Sample], tokenizer, monkeypatch: pytest.MonkeyPatch, cache_tokens: bool
) -> None:
    dataset = make_dataset(samples, tokenizer, cache_tokens=cache_tokens)

    def refuse(path: Path) -> torch.Tensor:
        raise AssertionError(f"lengths decoded {path}")

    monkeypatch.setattr(dataset.processor, "load_uint8", refuse)
    lengths = dataset.lengths
    assert lengths is dataset.lengths  # computed once
    monkeypatch.undo()
    assert lengths.tolist() == [len(dataset[i].input_ids) for i in range(len(dataset))]


@pytest.mark.parametrize("cache_images", [True, False])
def test_images_are_decoded_once_when_cached(samples: list[Sample], tokenizer, monkeypatch: pytest.MonkeyPatch, cache_images: bool) -> None:
    dataset = make_dataset(samples, tokenizer, cache_images=cache_images)
    decoded: list[Path] = []
    real = dataset.processor.load_uint8

    def counting(path: Path) -> torch.Tensor:
        decoded.append(path)
        return real(path)

    monkeypatch.setattr(dataset.processor, "load_uint8", counting)
    first = [dataset[i].images for i in range(len(dataset))]
    second = [dataset[i].images for i in range(len(dataset))]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # red.png appears in two samples: decoded once overall with the cache, on every access without it.
    assert len(decoded) == (2 if cache_images else 6)


@pytest.mark.parametrize("cache_tokens", [True, False])
def test_conversations_are_encoded_once_when_cached(
    samples: list[Sample], tokenizer, monkeypatch: pytest.MonkeyPatch, cache_tokens: bool
) -> None:
    dataset = make_dataset(samples, tokenizer, cache_tokens=cache_tokens)
    encoded = []
    real = dataset.encoder.encode

    def counting(turns):
        encoded.append(turns)
        return real(turns)

    monkeypatch.setattr(dataset.encoder, "encode", counting)
    first = dataset[1]
    first.input_ids[:] = -1  # a consumer scribbling on its sample must not reach the cache
    second = dataset[1]
    assert (second.input_ids >= 0).all()
    assert len(encoded) == (1 if cache_tokens else 2)


def test_image_broken_after_validation_names_record_and_file(samples: list[Sample], tokenizer) -> None:
    dataset = make_dataset(samples, tokenizer)
    broken = samples[0].image_paths[0]
    broken.write_bytes(broken.read_bytes()[:20])
    with pytest.raises(DataError) as raised:
        dataset[0]
    assert "record one" in str(raised.value) and str(broken) in str(raised.value)


def test_placeholder_mismatch_names_the_record(tokenizer, samples: list[Sample]) -> None:
    wrong = Sample(id="odd", source="hand-made", image_paths=samples[0].image_paths, turns=(Turn("user", "Hi"), Turn("assistant", "Hello.")))
    with pytest.raises(DataError, match="hand-made: record odd: 0 <image> placeholder"):
        make_dataset([wrong], tokenizer)[0]
