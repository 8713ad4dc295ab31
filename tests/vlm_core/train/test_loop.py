"""The stage loop: accumulation equals one big batch, the schedule is applied, metrics are written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from vlm_core.train.loop import LoopContext, StageSpec, StepOutput, run_stage
from vlm_core.train.metrics import MetricsLogger


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


class FixedSource:
    """The same samples every step, split into ``parts`` micro-batches."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, parts: int) -> None:
        self.chunks = list(zip(x.chunk(parts), y.chunk(parts)))
        self.position = 0

    def next_step(self) -> list[Any]:
        self.position += 1
        return self.chunks

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


def squared_error(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> StepOutput:
    x, y = batch
    return StepOutput(((model(x) - y) ** 2).sum(), units=len(y), stats={"samples": len(y)})


def train(parts: int, tmp_path: Path) -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = Regression()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 5, generator=generator), torch.randn(24, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    run_dir = tmp_path / f"parts{parts}"
    logger = MetricsLogger(run_dir, tensorboard=False)
    context = LoopContext(
        run_dir=run_dir, logger=logger, device=torch.device("cpu"), bf16=False, log_every=2, ckpt_every=4,
        keep_checkpoints=1, checkpoint_state=lambda: {"completed_stages": []}, show_progress=False,
    )
    spec = StageSpec("toy", steps=8, step_offset=100, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, grad_clip=1.0)
    run_stage(spec, model, optimizer, FixedSource(x, y, parts), squared_error, lambda w: {}, context)
    logger.close()
    return model, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_accumulation_matches_one_batch(parts: int, tmp_path: Path) -> None:
    whole, whole_log = train(1, tmp_path)
    split, split_log = train(parts, tmp_path)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        # Same maths, summed in a different order: fp32 rounding only (~1e-7 relative per step).
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs after accumulation")
    assert [r["loss"] for r in whole_log] == pytest.approx([r["loss"] for r in split_log], rel=1e-5)


def test_metrics_schedule_and_checkpoints(tmp_path: Path) -> None:
    _, log = train(1, tmp_path)
    assert [r["step"] for r in log] == [102, 104, 106, 108]  # global steps: offset 100 + stage steps
    assert log[0]["lr"] == pytest.approx(1e-2)  # end of warmup
    assert log[-1]["lr"] < log[0]["lr"]
    assert all({"loss", "lr", "grad_norm", "stage"} <= set(r) for r in log)
    checkpoints = tmp_path / "parts1" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000108"]  # keep_checkpoints=1
    state = json.loads((checkpoints / "step-000108" / "state.json").read_text())
    assert state["stage"] == "toy" and state["stage_step"] == 8 and state["data"] == {"position": 8}
