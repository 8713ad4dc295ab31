from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vlm_core.train import checkpoint
from vlm_core.train.checkpoint import (
    CheckpointError, latest_checkpoint, load_checkpoint, load_optimizer_state, save_checkpoint,
)


class Tied(nn.Module):
    """A model whose output layer shares the embedding weight, like the VLM's LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(ids))))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 11, (8,), generator=generator)
        loss = nn.functional.cross_entropy(model(ids), ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_round_trip_resumes_bit_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    train_steps(model, optimizer, 5, seed=1)
    save_checkpoint(tmp_path, "step-000005", model, optimizer, {"step": 5})
    expected = train_steps(model, optimizer, 5, seed=2)

    torch.manual_seed(123)  # a different init, fully overwritten by the checkpoint
    restored = Tied()
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=1e-2, foreach=False)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path), restored)
    load_optimizer_state(ckpt.path, restored_optimizer)
    assert ckpt.state["step"] == 5
    assert restored.head.weight is restored.embed.weight  # tying survives loading
    assert train_steps(restored, restored_optimizer, 5, seed=2) == expected


@pytest.mark.parametrize(("saved_fused", "running_fused"), [(False, True), (True, False)],
                         ids=["cpu_run_resumed_fused", "fused_run_resumed_on_cpu"])
def test_resume_keeps_the_running_optimizers_implementation(tmp_path: Path, saved_fused, running_fused) -> None:
    """A checkpoint from one AdamW implementation resumes in the other (a CPU run continued on a GPU, where
    build_optimizer fuses, and back): the moments and hyperparameters come from the checkpoint, the
    implementation stays the running one's, and the steps go on as an uninterrupted run's."""
    torch.manual_seed(0)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, **({"fused": True} if saved_fused else {}))
    train_steps(model, optimizer, 5, seed=1)
    save_checkpoint(tmp_path, "step-000005", model, optimizer, {"step": 5})
    expected = train_steps(model, optimizer, 5, seed=2)

    restored = Tied()
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=0.5, **({"fused": True} if running_fused else {}))
    load_optimizer_state(load_checkpoint(latest_checkpoint(tmp_path), restored).path, restored_optimizer)
    group = restored_optimizer.param_groups[0]
    assert bool(group["fused"]) is running_fused and group["lr"] == 1e-2
    # the fused and per-parameter updates round differently in the last bits
    torch.testing.assert_close(train_steps(restored, restored_optimizer, 5, seed=2), expected, rtol=1e-5, atol=0)


def test_rng_state_restored(tmp_path: Path) -> None:
    torch.manual_seed(7)
    save_checkpoint(tmp_path, "a", Tied(), None, {"step": 0})
    expected = torch.rand(3)
    torch.manual_seed(99)
    load_checkpoint(tmp_path / "a", Tied())
    assert torch.equal(torch.rand(3), expected)


def test_keep_and_latest_pointer(tmp_path: Path) -> None:
    model = Tied()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, f"step-{step:06d}", model, None, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "latest.json", "step-000003", "step-000004",
    ]
    assert latest_checkpoint(tmp_path).name == "step-000004"
    assert json.loads((tmp_path / "step-000004" / "state.json").read_text())["step"] == 4


def test_interrupted_write_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Tied()
    save_checkpoint(tmp_path, "step-000001", model, None, {"step": 1})

    def interrupted() -> dict:
        raise KeyboardInterrupt  # as if the process were stopped after the weights were written

    monkeypatch.setattr(checkpoint, "_rng_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "step-000002", model, None, {"step": 2})
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert not (tmp_path / "step-000002").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".step-000002")]


def test_mismatched_model_is_a_clear_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "x", Tied(), None, {"step": 0})
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(tmp_path / "x", nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_optimizer_state(tmp_path / "x", torch.optim.SGD(Tied().parameters(), lr=0.1))
