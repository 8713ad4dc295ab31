"""A round's curation beyond exact keys: near dedup against what is already there, and concept balancing.

Both reuse ``curate.py``'s stages, so the loop and the offline pipeline decide duplicates and skew alike:

- **near** (:func:`curation.stages.near.near_dedup`): colour pHash + thumbnail + MinHash LSH over the text, with
  the pool and every earlier round's kept samples as the reference. A teacher that draws a scene the pool
  already has (up to a pixel of jitter) with the same question adds nothing new; neither does a second copy
  inside the round. Only samples with new images are tested: self-augment's recaptions re-annotate pool images
  by design (VILA²), and their exact keys are already deduplicated.
- **balance** (:func:`curation.stages.balance.balance`, MetaCLIP's t / max(count, t)): within each skill of the
  increment and each concept family (colours, shapes, words), a concept far above its family's median is
  subsampled. The skills' shares are the sampler's plan and are never balanced away.

Features are the I/O edge: :func:`near_features` reads image files; the pool's are cached beside the world.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasketch import MinHashLSH
from tqdm import tqdm

from curation.config import BalanceConfig, NearConfig
from curation.images import image_facts
from curation.records import THUMB, sample_text
from curation.sources.world.config import COLORS, SHAPES, WORDS
from curation.stages.balance import balance, concept_tags
from curation.stages.near import minhashes, near_dedup
from vlm_core.loop.config import RoundBalanceConfig
from vlm_core.types import Sample

FAMILIES: dict[str, tuple[str, ...]] = {"color": COLORS, "shape": SHAPES, "word": WORDS}
FEATURES_FORMAT = 1
_MAX_PIXELS = 1 << 24  # generated images are trusted; this only guards against a stray huge file


@dataclass
class NearFeatures:
    """What the near stage compares, one row per sample: ids, pHashes, thumbnails, image flags, MinHashes."""

    ids: list[str]
    phashes: np.ndarray  # [N, 3] uint64
    thumbs: np.ndarray  # [N, THUMB, THUMB, 3] uint8
    has_image: np.ndarray  # [N] bool
    signatures: np.ndarray  # [N, num_perm] uint64

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, num_perm: int) -> NearFeatures:
        return cls([], np.zeros((0, 3), np.uint64), np.zeros((0, THUMB, THUMB, 3), np.uint8), np.zeros(0, bool),
                   np.zeros((0, num_perm), np.uint64))

    @classmethod
    def concat(cls, parts: Sequence[NearFeatures]) -> NearFeatures:
        return cls([i for p in parts for i in p.ids], *(np.concatenate([getattr(p, name) for p in parts])
                                                        for name in ("phashes", "thumbs", "has_image", "signatures")))

    def take(self, rows: np.ndarray) -> NearFeatures:
        return NearFeatures([self.ids[i] for i in rows], self.phashes[rows], self.thumbs[rows], self.has_image[rows],
                            self.signatures[rows])

    def save(self, path: Path) -> None:
        """Write atomically (a temporary file, then a rename): concurrent runs may share the pool's cache."""
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(staging, ids=np.array(self.ids, dtype=str), phashes=self.phashes, thumbs=self.thumbs,
                 has_image=self.has_image, signatures=self.signatures)
        os.replace(staging, path)

    @classmethod
    def load(cls, path: Path) -> NearFeatures:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["ids"].tolist(), data["phashes"], data["thumbs"], data["has_image"], data["signatures"])


def near_features(samples: Sequence[Sample], cfg: NearConfig, desc: str = "near: features") -> NearFeatures:
    """Read each sample's first image and hash its text (the I/O edge of the near stage)."""
    n = len(samples)
    phashes = np.zeros((n, 3), np.uint64)
    thumbs = np.zeros((n, THUMB, THUMB, 3), np.uint8)
    has_image = np.zeros(n, bool)
    for i, sample in enumerate(tqdm(samples, desc=desc, unit="img", disable=n < 2000, leave=False)):
        if not sample.image_paths:
            continue
        path = Path(sample.image_paths[0])
        try:
            facts = image_facts(path.read_bytes(), _MAX_PIXELS)
        except Exception as exc:  # a generated or pool image the loop cannot read is a bug upstream: say which
            raise RuntimeError(f"near dedup: cannot read {path} (sample {sample.id}): {exc}") from exc
        phashes[i], thumbs[i], has_image[i] = facts.phash, facts.thumb, True
    signatures = minhashes([sample_text(s) for s in samples], cfg) if n else np.zeros((0, cfg.num_perm), np.uint64)
    return NearFeatures([s.id for s in samples], phashes, thumbs, has_image, signatures)


def cached_near_features(samples: Sequence[Sample], cfg: NearConfig, directory: Path, name: str) -> NearFeatures:
    """:func:`near_features` of a fixed set (the pool), cached in ``directory`` by the samples' ids and the hashing."""
    key = hashlib.sha256(repr((FEATURES_FORMAT, cfg.num_perm, cfg.seed, cfg.shingle,
                               [(s.id, str(s.image_paths[:1]), sample_text(s)) for s in samples])).encode())
    path = directory / f"near-{name}-{key.hexdigest()[:12]}.npz"
    if path.is_file():
        return NearFeatures.load(path)
    features = near_features(samples, cfg, desc=f"near: {name} features")
    features.save(path)
    return features


def near_filter(features: NearFeatures, reference: NearFeatures, cfg: NearConfig,
                index: MinHashLSH | None = None) -> tuple[np.ndarray, Counter]:
    """Which of ``features``' samples survive near dedup against ``reference`` and each other: a keep mask and
    the removal counts by reason. ``index`` (``lsh_index`` of ``reference``, reused across calls) gains the kept."""
    both = NearFeatures.concat([reference, features])
    result = near_dedup(both.phashes, both.thumbs, both.has_image, both.signatures, both.ids, cfg,
                        reference=len(reference), index=index)
    removed: Counter = Counter()
    keep = np.ones(len(features), bool)
    for index in result.removed:
        keep[index - len(reference)] = False
        inside = result.columns["near_of"][index] >= len(reference)
        removed["near duplicate within the round" if inside else "near duplicate of pool or earlier round"] += 1
    return keep, removed


def balance_filter(samples: Sequence[Sample], cfg: RoundBalanceConfig,
                   seed: Sequence[int]) -> tuple[np.ndarray, Counter]:
    """MetaCLIP balance within each skill and concept family; a keep mask and the removal counts by family.

    ``seed`` (e.g. [balance seed, loop seed, round]) makes the draws reproducible and different per round.
    """
    keep = np.ones(len(samples), bool)
    removed: Counter = Counter()
    skills = sorted({s.skill or "" for s in samples})
    for skill_index, skill in enumerate(skills):
        alive = np.array([i for i, s in enumerate(samples) if (s.skill or "") == skill], dtype=np.int64)
        for family_index, (family, concepts) in enumerate(FAMILIES.items()):
            if len(alive) == 0:
                break
            tags = concept_tags([sample_text(samples[i]) for i in alive], concepts)
            draw_seed = int(np.random.SeedSequence([*seed, skill_index, family_index]).generate_state(1)[0])
            settings = BalanceConfig(tags=["concepts"], concepts=list(concepts), cap=cfg.cap, min_t=cfg.min_t,
                                     seed=draw_seed)
            result = balance(tags, settings, [samples[i].id for i in alive])
            if result.removed:
                removed[f"balanced: {skill} over-represents a {family}"] += len(result.removed)
                keep[alive[~result.keep]] = False
            alive = alive[result.keep]
    return keep, removed
