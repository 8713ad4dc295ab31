"""``report.json`` and ``report.md`` (with PNG plots) of a curation run; the reporting edge.

The report holds counts in/out per stage and per source, the accounting identity, why records were
quarantined (grouped), each stage's figures (semantic: removals per epsilon and cluster sizes; balance:
the caps), the skill and concept distributions before and after, and, for a dirty-world source, the recall
of every planted class and the share of clean records removed (:mod:`curation.truth`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curation.config import CurateConfig
from curation.stages.balance import concept_tags
from curation.truth import DUPLICATE_OF, DUPLICATE_STAGES, score_truth

if TYPE_CHECKING:
    from curation.pipeline import CurationResult

# Quarantine reasons grouped by what went wrong (first match wins).
REASON_GROUPS: tuple[tuple[str, str], ...] = (
    ("decompression bomb", "image: decompression bomb"),
    ("outside the image root", "image: path leaves the image root"),
    ("absolute path", "image: absolute path"),
    ("not found under the image root", "image: file missing"),
    ("empty file", "image: empty file"),
    ("not a readable image", "image: unreadable, truncated or corrupt"),
    ("not valid UTF-8", "text: not UTF-8"),
    ("invalid JSON", "record: invalid JSON"),
    ("unknown role", "conversations: unknown role"),
    ("empty", "conversations: empty turn"),
    ("placeholder", "conversations: <image> count does not match the images"),
    ("characters, more than validate.max_chars", "sample too long"),
    ("turns, more than", "sample has too many turns"),
    ("missing", "record: missing field"),
    ("tar member", "shard: unsafe tar member"),
)
TRIMMED_SUMMARY_KEYS = ("cluster_sizes", "tag_counts_before")


def reason_group(reason: str) -> str:
    for needle, group in REASON_GROUPS:
        if needle in reason:
            return group
    return "other: " + reason.split(":", 1)[0]


def _stage_rows(result: CurationResult) -> list[dict[str, Any]]:
    rows = []
    for stage, _ in result.stages:
        summary = {k: v for k, v in stage.summary.items() if k not in TRIMMED_SUMMARY_KEYS}
        if "over_represented" in summary:
            summary["over_represented"] = dict(list(summary["over_represented"].items())[:20])
        rows.append({"stage": stage.stage, "in": stage.n, "removed": len(stage.removed),
                     "out": stage.n - len(stage.removed), "summary": summary})
    return rows


def _distribution(result: CurationResult, indices, cfg: CurateConfig) -> dict[str, dict[str, int]]:
    items = [result.items[i] for i in indices]
    skills = Counter(item.sample.skill or "(none)" for item in items)
    concepts = Counter(tag.split(":", 1)[1] for tags in concept_tags([i.text for i in items], cfg.balance.concepts)
                       for tag in tags)
    return {"skills": dict(sorted(skills.items())), "concepts": dict(sorted(concepts.items()))}


def build_report(result: CurationResult, cfg: CurateConfig) -> dict[str, Any]:
    """Everything ``report.json`` holds, as a JSON-ready dict."""
    from curation.pipeline import check_accounting
    from curation.sources.world.dirty_writer import load_truth

    totals = check_accounting(result)
    removed = result.removed_by()
    per_stage = Counter(stage for stage, _ in removed.values())
    per_source: dict[str, Any] = {}
    for source in result.sources:
        per_source[source.name] = {"ingested": source.ingested, "quarantined": len(source.quarantined),
                                   "removed": {}, "kept": 0}
    for index, (stage, _) in removed.items():
        entry = per_source[result.items[index].source]["removed"]
        entry[stage] = entry.get(stage, 0) + 1
    for index in result.kept.tolist():
        per_source[result.items[index].source]["kept"] += 1
    report: dict[str, Any] = {
        "config_hash": result.config_hash,
        "counts": {**totals, "removed_by_stage": {s.stage: per_stage.get(s.stage, 0) for s, _ in result.stages}},
        "accounting": {
            "identity": "ingested = kept + quarantined + removed",
            "ok": True,
            "values": f"{totals['ingested']} = {totals['kept']} + {totals['quarantined']} + {totals['removed']}",
        },
        "embeddings": result.embeddings,
        "per_source": per_source,
        "stages": _stage_rows(result),
        "quarantine_reasons": dict(Counter(reason_group(q.reason) for q in result.quarantined).most_common()),
        "distribution": {
            "before": _distribution(result, range(len(result.items)), cfg),
            "after": _distribution(result, result.kept.tolist(), cfg),
        },
        "truth": {},
    }
    for source in result.sources:
        if "truth" not in source.lineage:
            continue
        outcome: dict[str, tuple[str, str]] = {q.record: ("quarantine", q.reason) for q in source.quarantined}
        texts: dict[str, str] = {}
        kept_ids: set[str] = set()
        kept = set(result.kept.tolist())
        for index, item in enumerate(result.items):
            if item.source != source.name:
                continue
            texts[item.sample.id] = item.text
            if index in removed:
                outcome[item.sample.id] = removed[index]
            elif index in kept:
                kept_ids.add(item.sample.id)
        skew = cfg.sources[source.name].dirty.skew_word if cfg.sources[source.name].kind == "dirty_world" else None
        report["truth"][source.name] = score_truth(load_truth(Path(source.lineage["truth"])), outcome, kept_ids,
                                                   texts, source.name, skew)
    return report


def atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a readable (0644) temporary file in the same folder and a rename."""
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    os.chmod(staging, 0o644)
    os.replace(staging, path)


def _plots(result: CurationResult, report: dict[str, Any], folder: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    semantic = next((s for s, _ in result.stages if s.stage == "semantic"), None)
    sizes = (semantic.summary.get("cluster_sizes") if semantic else None) or []
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(sizes, bins=min(50, max(5, len(sizes) // 2)), color="#4477aa")
        ax.set_xlabel("items per cluster")
        ax.set_ylabel("clusters")
        ax.set_title(f"semantic clusters (k = {len(sizes)})")
        fig.tight_layout()
        fig.savefig(folder / "cluster_sizes.png", dpi=110)
        plt.close(fig)
        made["cluster_sizes"] = "plots/cluster_sizes.png"
    for key, title in (("skills", "skill"), ("concepts", "concept")):
        before, after = report["distribution"]["before"][key], report["distribution"]["after"][key]
        names = sorted(set(before) | set(after), key=lambda name: -before.get(name, 0))[:30]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 3.4))
        x = np.arange(len(names))
        ax.bar(x - 0.2, [before.get(n, 0) for n in names], 0.4, label="ingested", color="#bbbbbb")
        ax.bar(x + 0.2, [after.get(n, 0) for n in names], 0.4, label="kept", color="#228833")
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("records")
        ax.set_title(f"{title} distribution before and after curation")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"{key}.png", dpi=110)
        plt.close(fig)
        made[key] = f"plots/{key}.png"
    pairs = _duplicate_examples(result)
    if pairs:
        from PIL import Image

        fig, axes = plt.subplots(len(pairs), 2, figsize=(4.4, 1.9 * len(pairs)), squeeze=False)
        for row, (stage, removed_item, kept_item) in enumerate(pairs):
            for col, (item, label) in enumerate(((removed_item, f"removed ({stage})"), (kept_item, "kept original"))):
                ax = axes[row][col]
                with Image.open(item.sample.image_paths[0]) as image:
                    ax.imshow(np.asarray(image.convert("RGB")))
                ax.set_title(f"{label}\n{item.sample.id}", fontsize=7)
                ax.axis("off")
        fig.tight_layout()
        fig.savefig(folder / "duplicates.png", dpi=110)
        plt.close(fig)
        made["duplicates"] = "plots/duplicates.png"
    return made


def _duplicate_examples(result: CurationResult, per_stage: int = 3) -> list[tuple[str, Any, Any]]:
    """Up to ``per_stage`` (stage, removed item, kept item) pairs from each dedup stage, with images."""
    by_uid = {item.uid: item for item in result.items}
    pairs = []
    for stage, inputs in result.stages:
        if stage.stage not in DUPLICATE_STAGES:
            continue
        count = 0
        for local, reason in sorted(stage.removed.items()):
            match = DUPLICATE_OF.search(reason)
            removed_item = result.items[int(inputs[local])]
            original = by_uid.get(match.group(1)) if match else None
            if original is None or not removed_item.images or not original.images:
                continue
            pairs.append((stage.stage, removed_item, original))
            count += 1
            if count == per_stage:
                break
    return pairs


def _markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    counts = report["counts"]
    lines = [
        "# Curation report", "",
        (f"Config hash `{report['config_hash']}`. Accounting: {report['accounting']['identity']}: "
        f"**{report['accounting']['values']}**. Embeddings: {report['embeddings'] or 'not computed'}."), "",
        "## Stages", "", "| stage | in | removed | out |", "|---|---:|---:|---:|",
        (f"| ingest (validation) | {counts['ingested']} | {counts['quarantined']} (quarantined) | "
        f"{counts['ingested'] - counts['quarantined']} |"),
    ]
    for row in report["stages"]:
        note = " (off)" if row["summary"].get("skipped") else ""
        lines.append(f"| {row['stage']}{note} | {row['in']} | {row['removed']} | {row['out']} |")
    lines += ["", "## Per source", "", "| source | ingested | quarantined | removed | kept |", "|---|---:|---:|---|---:|"]
    for name, entry in report["per_source"].items():
        removed = ", ".join(f"{k} {v}" for k, v in entry["removed"].items()) or "0"
        lines.append(f"| {name} | {entry['ingested']} | {entry['quarantined']} | {removed} | {entry['kept']} |")
    if report["quarantine_reasons"]:
        lines += ["", "## Why records were quarantined", "", "| reason | records |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in report["quarantine_reasons"].items()]
    semantic = next((r for r in report["stages"] if r["stage"] == "semantic" and "removed_per_epsilon" in r["summary"]), None)
    if semantic:
        summary = semantic["summary"]
        lines += ["", "## Semantic dedup", "",
                  f"{summary['clusters']} clusters on the {summary['device']}; epsilon applied: {summary['epsilon']}.", "",
                  "| epsilon | would remove |", "|---:|---:|"]
        lines += [f"| {eps} | {n} |" for eps, n in summary["removed_per_epsilon"].items()]
    balance = next((r for r in report["stages"] if r["stage"] == "balance" and "t" in r["summary"]), None)
    if balance and balance["summary"]["over_represented"]:
        lines += ["", "## Balancing", "", f"Caps t per tag kind: {balance['summary']['t']}. Over-represented tags:", ""]
        lines += [f"- `{tag}`: {count} records" for tag, count in balance["summary"]["over_represented"].items()]
    for name, truth in report["truth"].items():
        lines += ["", f"## Planted defects in `{name}` (ground truth)", "",
                  "| class | planted | removed | rate | by stage |", "|---|---:|---:|---:|---|"]
        for cls, entry in truth["classes"].items():
            stages = ", ".join(f"{k} {v}" for k, v in sorted(entry["by_stage"].items()))
            lines.append(f"| {cls} | {entry['planted']} | {entry['removed']} | {entry['rate']:.1%} | {stages} |")
        lines += ["", (f"Clean records removed: {truth['clean_removed']} ({truth['clean_removed_rate']:.2%}), "
                      f"of which {truth['clean_removed_natural_duplicates']} were duplicates of another clean record.")]
        if "skew" in truth:
            skew = truth["skew"]
            lines.append(f"Skewed concept `{skew['word']}`: {skew['records_with_word']} records before "
                         f"({skew['clean_records_with_word']} clean), {skew['kept_with_word']} kept; "
                         f"{skew['excess_removed']:.1%} of the planted excess removed.")
    for key, title in (("cluster_sizes", "Cluster sizes"), ("skills", "Skills before and after"),
                       ("concepts", "Concepts before and after"), ("duplicates", "Duplicate examples")):
        if key in plots:
            lines += ["", f"## {title}", "", f"![{title}]({plots[key]})"]
    return "\n".join(lines) + "\n"


def write_report(result: CurationResult, cfg: CurateConfig, output: Path) -> None:
    """Write report.json, report.md and plots/*.png into ``output``."""
    report = result.report
    atomic_text(output / "report.json", json.dumps(report, indent=1, default=str))
    plots = _plots(result, report, output / "plots")
    atomic_text(output / "report.md", _markdown(report, plots))
