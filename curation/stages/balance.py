"""Stage 5, semantic balancing (MetaCLIP, Xu et al. 2023): cap over-represented clusters, skills and concepts.

Each tag (``cluster:17``, ``skill:ocr``, ``concept:CAT``) with ``count`` records keeps each of them with
probability ``t / max(count, t)``; tags below ``t`` keep everything. ``t`` is set per tag kind as ``cap``
times the median count of that kind's tags (and at least ``min_t``), so a kind whose tags are about equally
frequent loses nothing and a tag at 20x the median keeps ~1/16 of its records (with the default cap 1.25).
A record with several tags of one kind keeps the smallest probability (``combine=min``: the most
over-represented tag decides) or, with ``combine=any``, MetaCLIP's rule (it survives if any of its tags keeps
it). Kinds are balanced one after the other in the configured order, each with its own seeded uniform draw
per record.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from curation.config import BalanceConfig
from curation.records import StageResult


def concept_tags(texts: Sequence[str], concepts: Sequence[str]) -> list[list[str]]:
    """The concepts each text mentions, as whole words (case-sensitive): MetaCLIP's substring matching."""
    if not concepts:
        return [[] for _ in texts]
    pattern = re.compile(r"\b(" + "|".join(re.escape(c) for c in sorted(concepts, key=len, reverse=True)) + r")\b")
    return [sorted({f"concept:{match}" for match in pattern.findall(text)}) for text in texts]


def thresholds(tags: Sequence[Sequence[str]], cap: float, min_t: float = 0.0) -> tuple[Counter, float]:
    """Tag counts (each record counted once per tag) and t = max(cap x the median count, min_t), for tags of one kind."""
    counts = Counter(tag for record_tags in tags for tag in set(record_tags))
    return counts, max(cap * float(np.median(list(counts.values()))), min_t) if counts else 0.0


def balance(tags: Sequence[Sequence[str]], cfg: BalanceConfig, uids: Sequence[str]) -> StageResult:
    """Subsample records of over-represented tags, one tag kind at a time. Columns: ``keep_probability``.

    ``tags[i]`` lists record i's tags as ``"<kind>:<value>"``. Kinds are balanced in the order of
    ``cfg.tags``, each on the records the previous kinds kept: a concept at 20x its share also inflates its
    skill, and once the concept is capped the skill is no longer over-represented, so the other records
    of that skill keep their place.
    """
    n = len(tags)
    alive = np.ones(n, dtype=bool)
    probability = np.ones(n, dtype=np.float64)
    removed: dict[int, str] = {}
    summary: dict = {"t": {}, "over_represented": {}, "tag_counts_before": {}}
    for position, kind in enumerate(cfg.tags):
        prefix = f"{kind[:-1] if kind.endswith('s') else kind}:"  # "concepts" → "concept:"
        rows = np.flatnonzero(alive)
        kind_tags = [[tag for tag in tags[i] if tag.startswith(prefix)] for i in rows]
        counts, t = thresholds(kind_tags, cfg.cap, cfg.min_t)
        if not counts:
            continue
        summary["t"][kind] = round(t, 2)
        summary["tag_counts_before"].update(counts)
        summary["over_represented"].update({tag: c for tag, c in counts.items() if c > t})
        rule = f"{cfg.cap:g} x the median {kind} count" if t > cfg.min_t else f"balance.min_t={cfg.min_t:g}"
        draws = np.random.default_rng([cfg.seed, position]).random(len(rows))
        for k, i in enumerate(rows):
            per_tag = {tag: min(1.0, t / counts[tag]) for tag in set(kind_tags[k])}
            if not per_tag:
                continue
            tag = min(per_tag, key=lambda name: (per_tag[name], name))
            p = per_tag[tag] if cfg.combine == "min" else 1.0 - float(np.prod([1.0 - v for v in per_tag.values()]))
            probability[i] *= p
            if draws[k] >= p:
                alive[i] = False
                removed[int(i)] = (
                    f"balanced: tag {tag} has {counts[tag]:,} records, above t = {t:.0f} ({rule}); "
                    f"keep probability {p:.3f}"
                )
    summary["over_represented"] = dict(sorted(summary["over_represented"].items(), key=lambda kv: -kv[1]))
    summary["tag_counts_before"] = dict(sorted(summary["tag_counts_before"].items()))
    return StageResult("balance", n, removed, {"keep_probability": probability.astype(np.float32)}, summary)
