"""Score a curation run against the dirty world's ground truth (``truth.jsonl``): recall per planted class.

A planted record counts as caught when it was quarantined or removed by any stage. Clean records that
were removed are counted overall and per stage; those removed as a duplicate of another *clean* record
are also listed apart ("natural duplicates": the world itself sometimes draws the same scene and question
twice, a few pixels of jitter apart).

For the skewed concept, balancing removes records of the concept at random, so which surplus record goes
is arbitrary. Two figures are reported: ``recall`` (share of the planted surplus records removed) and
``excess_removed`` (records of the concept removed / planted surplus: how much of the excess count is gone).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

DUPLICATE_STAGES = ("exact", "near", "semantic")
DUPLICATE_OF = re.compile(r"duplicate of (\S+)")  # the uid a dedup stage's reason names


def score_truth(
    truth: Sequence[dict[str, Any]],
    outcome: dict[str, tuple[str, str]],
    kept_ids: set[str],
    texts: dict[str, str],
    source: str,
    skew_word: str | None = None,
) -> dict[str, Any]:
    """Recall per class and clean-removal rate.

    ``truth``: rows of truth.jsonl ({"index", "id", "class", ...}); ``outcome``: record label (an id, or
    "#<index>" for a record quarantined before its id could be read) → (stage or "quarantine", reason) for
    every record not kept; ``kept_ids``: ids kept; ``texts``: id → text of ingested records (for the skew
    word count); ``source``: the source's name (uids are "<source>/<id>").
    """
    classes: dict[str, dict[str, Any]] = {}
    clean_removed_by: Counter = Counter()
    natural = 0
    clean_ids = {row["id"] for row in truth if row["class"] == "clean"}
    for row in truth:
        label = row["id"] if row["id"] in outcome or row["id"] in kept_ids else f"#{row['index']}"
        entry = classes.setdefault(row["class"], {"planted": 0, "removed": 0, "by_stage": Counter()})
        entry["planted"] += 1
        if label in outcome:
            stage, reason = outcome[label]
            entry["removed"] += 1
            entry["by_stage"][stage] += 1
            if row["class"] == "clean":
                clean_removed_by[stage] += 1
                match = DUPLICATE_OF.search(reason)
                if stage in DUPLICATE_STAGES and match and match.group(1).split("/", 1)[-1] in clean_ids:
                    natural += 1
        elif label not in kept_ids:
            raise ValueError(f"truth record {row['id']} (#{row['index']}) is neither kept nor removed nor quarantined")
    report: dict[str, Any] = {"source": source, "classes": {}}
    for name, entry in sorted(classes.items()):
        report["classes"][name] = {
            "planted": entry["planted"], "removed": entry["removed"],
            "rate": entry["removed"] / entry["planted"] if entry["planted"] else 0.0,
            "by_stage": dict(entry["by_stage"]),
        }
    clean = report["classes"].get("clean", {"planted": 0, "removed": 0})
    report["clean_removed"] = clean["removed"]
    report["clean_removed_rate"] = clean["removed"] / clean["planted"] if clean["planted"] else 0.0
    report["clean_removed_natural_duplicates"] = natural
    report["clean_removed_by_stage"] = dict(clean_removed_by)
    planted = {name: entry for name, entry in report["classes"].items() if name != "clean"}
    report["recall"] = {name: entry["rate"] for name, entry in planted.items()}
    if skew_word and "skew" in classes:
        pattern = re.compile(rf"\b{re.escape(skew_word)}\b")
        with_word = {i for i, text in texts.items() if pattern.search(text)}
        clean_with_word = len(with_word & clean_ids)
        surplus = classes["skew"]["planted"]
        removed_with_word = sum(1 for i in with_word if i in outcome)
        report["skew"] = {
            "word": skew_word, "records_with_word": len(with_word), "clean_records_with_word": clean_with_word,
            "kept_with_word": len(with_word & kept_ids), "surplus": surplus,
            "excess_removed": removed_with_word / surplus if surplus else 0.0,
        }
    return report
