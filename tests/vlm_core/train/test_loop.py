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


def test_steps_between_log_lines_read_nothing_back(tmp_path: Path, monkeypatch) -> None:
    """A step that writes no log line leaves its loss and grad norm on the device: on a GPU, reading them
    (float(), .item()) would hold the host until the backward had run, before it launched the optimizer. Only
    a log line reads the window back. Counted as the ATen op behind every such read, _local_scalar_dense, outside
    the optimizer's step (torch's AdamW reads its step counts, which it keeps on the host for CUDA parameters)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountReads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.reads_per_step: list[int] = [0]
            self.active = True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.active and func.overloadpacket.__name__ == "_local_scalar_dense":
                self.reads_per_step[-1] += 1
            return func(*args, **(kwargs or {}))

    counter = CountReads()
    step = torch.optim.AdamW.step

    def counted_step(self, *args, **kwargs):
        counter.active = False
        result = step(self, *args, **kwargs)
        counter.active = True
        counter.reads_per_step.append(0)  # what follows belongs to the next step (or this one's log line)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    with counter:
        _, log = train(2, tmp_path)  # 8 steps, a log line every 2nd
    reads = counter.reads_per_step
    # reads[i]: step i's log line (after its optimizer step), then step i + 1's forward, backward and clipping
    assert len(reads) == 9 and [reads[i] for i in (0, 1, 3, 5, 7)] == [0] * 5, reads
    assert all(reads[i] > 0 for i in (2, 4, 6, 8)), reads  # steps 2, 4, 6, 8 log: their window is read back
    assert len(log) == 4 and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in log)
