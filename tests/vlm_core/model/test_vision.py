"""Vision tower, projector and the stage-0 tower heads."""

from __future__ import annotations

import pytest
import torch

from vlm_core.model.config import VisionConfig
from vlm_core.model.projector import Projector
from vlm_core.model.tower_heads import TowerHeads
from vlm_core.model.vision import VisionTower
from vlm_core.types import IGNORE_INDEX


def tiny_vision(**overrides) -> VisionConfig:
    fields = dict(image_size=48, patch_size=16, dim=32, layers=2, heads=2)  # 3x3 grid, P = 9
    fields.update(overrides)
    return VisionConfig(**fields)


def test_output_shape_and_zero_images():
    tower = VisionTower(tiny_vision())
    assert tower(torch.randn(2, 3, 48, 48)).shape == (2, 9, 32)  # [N_img, P, D_v]
    assert tower(torch.zeros(0, 3, 48, 48)).shape == (0, 9, 32)


@pytest.mark.parametrize(
    "shape", [(2, 3, 32, 32), (2, 1, 48, 48), (3, 48, 48), (2, 3, 48, 32)], ids=["size", "channels", "3d", "not_square"]
)
def test_wrong_image_shape_raises(shape):
    tower = VisionTower(tiny_vision())
    with pytest.raises(ValueError, match=r"expected \[N_img, 3, 48, 48\]"):
        tower(torch.randn(*shape))


def test_integer_images_raise():
    with pytest.raises(ValueError, match="float"):
        VisionTower(tiny_vision())(torch.zeros(1, 3, 48, 48, dtype=torch.uint8))


def test_patches_are_row_major():
    # With every residual branch zeroed the blocks are the identity, so patch k of the output depends on
    # pixels of grid cell (k // grid, k % grid) only.
    tower = VisionTower(tiny_vision())
    with torch.no_grad():
        tower.position_embedding.zero_()
        for block in tower.blocks:
            for layer in (block.attention.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
    images = torch.randn(1, 3, 48, 48)
    base = tower(images)
    changed = images.clone()
    changed[0, :, 0:16, 32:48] += 1.0  # row 0, column 2 of the 3x3 grid
    effect = (tower(changed) - base).abs().amax(dim=-1)[0]  # [P]
    assert effect[2] > 1e-3 and torch.all(effect[[0, 1, 3, 4, 5, 6, 7, 8]] == 0), effect.tolist()


def test_attention_mixes_patches():
    # With its blocks intact, changing one patch changes every patch's feature (bidirectional attention).
    torch.manual_seed(0)
    tower = VisionTower(tiny_vision())
    images = torch.randn(1, 3, 48, 48)
    changed = images.clone()
    changed[0, :, 32:48, 32:48] += 1.0  # last patch
    effect = (tower(changed) - tower(images)).abs().amax(dim=-1)[0]
    assert torch.all(effect > 1e-5), effect.tolist()


def test_projector_shape():
    assert Projector(32, 48, 64)(torch.randn(2, 9, 32)).shape == (2, 9, 64)


SPACES = {"color": 5, "shape": 4, "row": 3}


def test_tower_heads_fit_a_fixed_batch():
    torch.manual_seed(0)
    tower = VisionTower(tiny_vision())
    heads = TowerHeads(32, SPACES)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 48, 48, generator=generator)
    labels = {name: torch.randint(0, n, (4, 9), generator=generator) for name, n in SPACES.items()}
    labels["color"][0, :3] = IGNORE_INDEX  # unlabelled patches take no part
    optimizer = torch.optim.Adam([*tower.parameters(), *heads.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        loss, accuracy = heads.loss(heads(tower(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Chance is log(classes) ~ 1.3; 36 random labels per head are memorisable by a 2-layer ViT.
    assert losses[-1] < 0.5 * losses[0], losses
    assert set(accuracy) == set(SPACES)
    assert all(0.0 <= float(value) <= 1.0 for value in accuracy.values())


def test_tower_heads_loss_matches_cross_entropy_and_accuracy():
    heads = TowerHeads(8, {"a": 3, "b": 2})
    logits = {"a": torch.randn(2, 4, 3), "b": torch.randn(2, 4, 2)}
    labels = {"a": torch.randint(0, 3, (2, 4)), "b": torch.randint(0, 2, (2, 4))}
    labels["b"][1] = IGNORE_INDEX
    loss, accuracy = heads.loss(logits, labels)
    ce_a = torch.nn.functional.cross_entropy(logits["a"].reshape(-1, 3), labels["a"].reshape(-1))
    ce_b = torch.nn.functional.cross_entropy(logits["b"][0], labels["b"][0])
    torch.testing.assert_close(loss, (ce_a + ce_b) / 2)
    want_b = (logits["b"][0].argmax(-1) == labels["b"][0]).float().mean()
    torch.testing.assert_close(accuracy["b"], want_b)


def test_tower_heads_errors():
    heads = TowerHeads(8, {"a": 3})
    with pytest.raises(ValueError, match="differ"):
        heads.loss({"a": torch.randn(1, 4, 3)}, {"b": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="one label per patch"):
        heads.loss({"a": torch.randn(1, 4, 3)}, {"a": torch.zeros(1, 5, dtype=torch.long)})
    with pytest.raises(ValueError, match="at least 2"):
        TowerHeads(8, {"a": 1})
