"""Sample-level checks at ingest, after the LLaVA loader's record checks: length and number of turns."""

from __future__ import annotations

from curation.config import ValidateConfig
from vlm_core.types import Sample


def sample_problem(sample: Sample, cfg: ValidateConfig) -> str | None:
    """Why ``sample`` cannot be used (the reason names the field), or None when it can."""
    if len(sample.turns) > cfg.max_turns:
        return (
            f"conversations: {len(sample.turns)} turns, more than validate.max_turns={cfg.max_turns}; "
            "split the conversation"
        )
    chars = sum(len(turn.text) for turn in sample.turns)
    if chars > cfg.max_chars:
        longest = max(range(len(sample.turns)), key=lambda i: len(sample.turns[i].text))
        return (
            f"conversations: {chars:,} characters, more than validate.max_chars={cfg.max_chars:,} "
            f"(longest: turn {longest}, {len(sample.turns[longest].text):,}); shorten or split the sample"
        )
    return None
