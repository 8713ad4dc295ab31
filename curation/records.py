"""The typed hand-offs of curation: what ingest produces and what every stage returns.

    source files ──► ingest ──► Item (validated Sample + ImageFacts) ──► stage ──► StageResult ──► ...
                        └──► QuarantinedRecord (vlm_core.types)

A stage is a pure function of arrays built from the items (hashes, embeddings, tags), its config and, where
it draws, a seed; it returns a :class:`StageResult` naming the removed inputs with a reason each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlm_core.data.tokenizer import IMAGE_TOKEN
from vlm_core.types import Sample

THUMB = 16  # side of the thumbnail kept per image (the pixel embedding and the report's examples use it)


def sample_text(sample: Sample) -> str:
    """All turns, one per line, without the ``<image>`` placeholders: what text dedup and embeddings see."""
    return "\n".join(turn.text.replace(IMAGE_TOKEN, " ").strip() for turn in sample.turns)


@dataclass(frozen=True)
class ImageFacts:
    """What curation needs from one decoded image, measured once at ingest."""

    width: int
    height: int
    pixel_sha: str  # sha256 of the size and the decoded RGB pixels: equal for re-encodings of the same pixels
    content_sha: str  # sha256 of the file's bytes: the cache key of everything computed from the image
    phash: tuple[int, int, int]  # 64-bit perceptual hash (imagehash.phash) of each of the R, G, B channels
    mean: float  # mean pixel value, 0-255
    std: float  # spatial standard deviation, root mean square over R, G, B (0-255): ~0 for a one-colour image
    thumb: np.ndarray = field(repr=False, compare=False)  # [THUMB, THUMB, 3] uint8, box-filtered


@dataclass(frozen=True)
class Item:
    """A validated record entering the stages: the sample, the facts of its images, and where it came from."""

    uid: str  # "<source name>/<record id>", unique across the run
    source: str  # the source's name in the config
    sample: Sample
    images: tuple[ImageFacts, ...]

    @property
    def text(self) -> str:
        return sample_text(self.sample)

    @property
    def assistant_chars(self) -> int:
        return sum(len(turn.text) for turn in self.sample.turns if turn.role == "assistant")


@dataclass
class StageResult:
    """The decisions of one stage over its ``n`` inputs (the items that reached it, in order).

    ``removed`` maps an input index to the reason it was removed; every other input is kept.
    ``columns`` holds per-input values for the manifest and the report (a cluster id, a score), each of
    length ``n``. ``summary`` holds stage-level figures for ``report.json`` (JSON-serialisable).
    """

    stage: str
    n: int
    removed: dict[int, str] = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [i for i in self.removed if not 0 <= i < self.n]
        if bad:
            raise ValueError(f"stage {self.stage}: removed indices {bad[:5]} are outside its {self.n} inputs")
        for name, values in self.columns.items():
            if len(values) != self.n:
                raise ValueError(f"stage {self.stage}: column {name!r} has {len(values)} values for {self.n} inputs")

    @property
    def keep(self) -> np.ndarray:
        """``[n]`` bool, True for kept inputs."""
        mask = np.ones(self.n, dtype=bool)
        mask[list(self.removed)] = False
        return mask


def skipped(stage: str, n: int) -> StageResult:
    """The result of a disabled stage: everything kept."""
    return StageResult(stage, n, summary={"skipped": True})
