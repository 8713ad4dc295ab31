"""Stage 1 cell-word alignment: targets come from the right words, and the loss teaches them."""

from __future__ import annotations


import pytest
import torch

from curation.sources.world import WorldConfig
from vlm_core.data.tokenizer import load_tokenizer, train_tokenizer
from vlm_core.model.config import ModelConfig, VisionConfig
from vlm_core.model.vlm import VLM
from vlm_core.train.align_words import WORD_HEADS, cell_word_loss, word_token_table
from vlm_core.train.optim import build_optimizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    world = WorldConfig()
    texts = [f"What color is the {s}? {c} {s} at top left." for s in world.shapes for c in world.colors]
    texts += [f"small large {w}" for w in world.words] * 3
    # answers start a line, so the bare words must be frequent enough to become single tokens
    texts += [word for word in (*world.colors, *world.shapes, *world.sizes)] * 20
    return load_tokenizer(train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400))


def test_table_maps_classes_to_their_words(tokenizer) -> None:
    world = WorldConfig()
    table = word_token_table(world, tokenizer)
    assert set(table) == set(WORD_HEADS)
    assert table["color"].shape == (len(world.colors) + 1, 2) and (table["color"][0] == -1).all()
    red = world.colors.index("red") + 1
    assert tokenizer.decode([int(table["color"][red, 0])]) == "red"
    assert tokenizer.decode([int(table["color"][red, 1])]) == " red"
    assert (table["shape"][-1] == -1).all()  # the "word cell" class names no shape


def test_loss_aligns_image_tokens_with_words(tokenizer) -> None:
    torch.manual_seed(0)
    world = WorldConfig()
    cfg = ModelConfig(vision=VisionConfig(image_size=32, patch_size=16, dim=32, layers=1, heads=2),
                      dim=32, layers=1, heads=2, kv_heads=1)
    model = VLM(cfg, vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    table = word_token_table(world, tokenizer)
    images = torch.randn(6, 3, 32, 32)
    generator = torch.Generator().manual_seed(1)
    labels = {head: torch.randint(0, len(table[head]), (6, 4), generator=generator) for head in WORD_HEADS}
    optimizer = build_optimizer(model, ["projector"], 3e-2, 0.0, (0.9, 0.98))
    first = None
    for _ in range(200):
        out = cell_word_loss(model, (images, labels), table)
        loss = out.loss_sum / out.units
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not any(p.grad is not None for p in model.decoder.parameters())  # only the projector trains
    assert loss.item() < 0.8 * first, (first, loss.item())
    assert out.stats["top1_hits"] / out.stats["cells"] > 0.9
