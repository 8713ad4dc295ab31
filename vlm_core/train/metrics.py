"""Run logs: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard events under ``tb/``."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class MetricsLogger:
    """Appends one record per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    ``resume_step`` drops records after that step, so a run resumed from a checkpoint leaves exactly one
    record per step in the file, as if it had never been interrupted.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step discards events past the resume point, like the truncation above
            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, stage: str, metrics: dict[str, float]) -> None:
        record: dict[str, Any] = {"step": step, "stage": stage}
        for key, value in metrics.items():
            record[key] = float(value) if math.isfinite(value) else str(value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"{stage}/{key}", value, step)

    def log_scalars(self, step: int, prefix: str, values: dict[str, float]) -> None:
        """TensorBoard only (e.g. held-out accuracy per skill, which eval.json already records)."""
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def log_samples(self, step: int, images: np.ndarray, texts: list[str]) -> None:
        """TensorBoard: a grid of ``images`` ([N, H, W, 3] uint8) and the model's answers as markdown."""
        if self._tb is None or len(images) == 0:
            return
        self._tb.add_images("samples/images", images, step, dataformats="NHWC")
        table = "\n".join(f"{i}. {text}" for i, text in enumerate(texts))
        self._tb.add_text("samples/answers", table, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
