"""Stage 6, the mixture: a fractional weight per source, optionally scaled to a sample or token budget.

A weight is a repetition factor: 0.3 = a seeded 30% of the source, 2.5 = two full copies and a seeded
half (how ``train.py`` reads it, :mod:`vlm_core.data.manifest`). LLaVA-NeXT, VILA and LlamaFactory can only
repeat whole datasets; here any real weight works, and a budget scales all weights by one factor so that
the expected size of the mixture is the budget. The stage removes nothing: a weight-0 source stays in the
manifest so that ``mixture.weights.<source>=...`` can bring it back at training time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from curation.config import MixtureStageConfig
from curation.records import StageResult


def approximate_tokens(text: str) -> int:
    """Text tokens, estimated as characters / 4 (image tokens excluded; they depend on the model)."""
    return max(1, -(-len(text) // 4))


def mixture_weights(sources: Sequence[str], tokens: np.ndarray, cfg: MixtureStageConfig) -> StageResult:
    """The weight of every record: its source's configured weight (default 1) times the budget's scale."""
    n = len(sources)
    names = list(dict.fromkeys(sources))
    base = {name: float(cfg.weights.get(name, 1.0)) for name in names}
    per_record = np.array([base[s] for s in sources], dtype=np.float64)
    scale = 1.0
    if cfg.budget_samples is not None or cfg.budget_tokens is not None:
        amount = per_record.sum() if cfg.budget_samples is not None else float((per_record * tokens).sum())
        budget = cfg.budget_samples if cfg.budget_samples is not None else cfg.budget_tokens
        if amount <= 0:
            raise ValueError("mixture: every source has weight 0, so no budget can be reached; raise a weight")
        scale = budget / amount
    weights = per_record * scale
    sources_array = np.asarray(sources, dtype=object)
    summary = {
        "scale": scale,
        "sources": {
            name: {
                "records": int((sources_array == name).sum()),
                "weight": base[name] * scale,
                "expected_samples": float(weights[sources_array == name].sum()),
                "expected_tokens": float((weights * tokens)[sources_array == name].sum()),
            }
            for name in names
        },
    }
    return StageResult("mixture", n, {}, {"weight": weights.astype(np.float64)}, summary)
