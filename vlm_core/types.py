"""The typed hand-offs between stages of the data path.

    raw records ──► Sample ──► TokenizedSample ──► PackedBatch ──► model ──► EvalReport

Shape letters used across the package (defined once, here):

    B        samples (or prompts) in a batch
    T        tokens of one sample
    total    tokens of a packed batch, all samples back to back (rows × row_len with padded rows)
    N_img    images in a batch
    P        image tokens per image (patch grid cells)
    C, H, W  image channels, height, width
    D_v      vision width;  D   decoder width;  V   vocabulary size
    Hq, Hkv  query and key/value heads;  Dh  head dim
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

IGNORE_INDEX = -100  # label value that carries no loss (PyTorch's cross_entropy default)

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Turn:
    """One message. A user turn may contain ``<image>`` placeholders, one per image of the sample."""

    role: Role
    text: str


@dataclass(frozen=True)
class Sample:
    """A validated conversation about zero or more images.

    ``image_paths`` are resolved and guaranteed to lie inside the image root they were read from.
    ``skill`` is the world's skill tag (``color``, ``count``...) or None for data without one.
    ``meta`` carries source-specific extras (for the world: the question's oracle fields).
    """

    id: str
    source: str
    image_paths: tuple[Path, ...]
    turns: tuple[Turn, ...]
    skill: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QuarantinedRecord:
    """A record that failed validation, with where it came from and why (``quarantine.jsonl`` row)."""

    source: str  # file the record was read from
    record: str  # record id, or "#<index>" when the record has no usable id
    reason: str  # names the field and what was wrong


@dataclass
class TokenizedSample:
    """One sample as token ids. ``<image>`` is already expanded to P image tokens per image."""

    input_ids: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] bool, True on tokens the model must predict (assistant turns + their EOS)
    bidir_group: torch.Tensor  # [T] int32, 0 for text, k for the k-th image of the sample (1-based)
    images: torch.Tensor  # [N_img, C, H, W] float32, preprocessed; N_img may be 0
    sample_id: str = ""


@dataclass
class PackedBatch:
    """Several samples back to back in ``rows`` rows of ``row_len`` slots, flattened to ``total``.

    The contract of DESIGN.md: attention from token i to j is allowed iff i and j are in the same
    segment of ``cu_seqlens`` and (j <= i or bidir_group[i] == bidir_group[j] != 0). The padding at the
    end of each row forms its own segment, so ``cu_seqlens[-1] == total`` and shapes stay static; packed
    without padding (``pack(..., pad_rows=False)``), the rows are only FFD's order of the samples and
    ``total == num_real_tokens``.
    """

    input_ids: torch.Tensor  # [total] int64
    position_ids: torch.Tensor  # [total] int64, restart at 0 for every segment
    cu_seqlens: torch.Tensor  # [n_segments + 1] int32, cu_seqlens[0] == 0, cu_seqlens[-1] == total
    max_seqlen: int  # longest segment
    bidir_group: torch.Tensor  # [total] int32, unique non-zero id per image within the batch
    labels: torch.Tensor  # [total] int64, labels[t] = token to predict at t, or IGNORE_INDEX
    images: torch.Tensor  # [N_img, C, H, W], in the order their tokens appear in input_ids
    rows: int
    row_len: int
    num_samples: int  # real samples (padding segments excluded)
    num_real_tokens: int  # tokens that belong to samples

    @property
    def total(self) -> int:
        """Slots in the stream: rows × row_len when the rows are padded, the samples' tokens when not."""
        return self.input_ids.shape[0]

    @property
    def efficiency(self) -> float:
        """Real tokens / slots: the share of compute that is not padding."""
        return self.num_real_tokens / max(1, self.total)

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {
            name: (value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return PackedBatch(**moved)


@dataclass
class EvalReport:
    """Held-out scores. ``skills`` maps a skill to its mean score in [0, 1]; ``chance`` to its chance level."""

    overall: float
    skills: dict[str, float]
    counts: dict[str, int]
    chance: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few (question, answer, reference) rows
    predictions: list[dict[str, Any]] = field(default_factory=list)  # every row; written to predictions.jsonl

    def to_json(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "skills": self.skills,
            "counts": self.counts,
            "chance": self.chance,
            "examples": self.examples,
        }
