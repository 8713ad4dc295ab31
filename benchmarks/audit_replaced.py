"""Audit self-augment's caption replacements in finished loop runs against the world's ground truth.

On a world built with ``data.world.caption_noise``, every noisy training caption records the scene whose caption it
carries (``meta["caption_from"]`` in the run's ``pool.parquet``). A replacement is *right* when the pool caption it
drops is one of those. For each run directory and round this prints, as a markdown table: how many pool captions
that round's recaptions replace, how many are replaced so far (the mixture drops the union over rounds), how many
of those were noisy, and what share of all noisy captions is fixed.

    python benchmarks/audit_replaced.py outputs/exp_metabolize/noisy/seed0/adaptive outputs/exp_metabolize/noisy/seed1/adaptive
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq


def noisy_captions(pool: Path) -> tuple[int, set[str]]:
    """(caption records in the pool, ids of those whose caption belongs to another scene)."""
    if not pool.is_file():
        raise FileNotFoundError(f"{pool}: no pool.parquet; is this a metabolize.py output directory?")
    rows = pq.read_table(pool, columns=["id", "skill", "meta"]).to_pylist()
    captions = [r for r in rows if r["skill"] == "caption"]
    noisy = set()
    for r in captions:
        try:
            meta = json.loads(r["meta"] or "{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"{pool}: record {r['id']!r}, field 'meta': not JSON ({err})") from err
        if "caption_from" in meta:
            noisy.add(r["id"])
    return len(captions), noisy


def audit(run: Path) -> list[dict]:
    """One row per finished round ≥ 1 of ``run``."""
    n_captions, noisy = noisy_captions(run / "pool.parquet")
    rows, so_far = [], set()
    k = 1
    while (run / f"round-{k}" / "replaced.json").is_file():
        path = run / f"round-{k}" / "replaced.json"
        try:
            this_round = set(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from err
        so_far |= this_round
        rows.append({"run": str(run), "round": k, "captions": n_captions, "noisy": len(noisy),
                     "replaced_round": len(this_round), "replaced_so_far": len(so_far),
                     "replaced_noisy": len(so_far & noisy),
                     "precision": len(so_far & noisy) / len(so_far) if so_far else float("nan"),
                     "noisy_fixed": len(so_far & noisy) / len(noisy) if noisy else float("nan")})
        k += 1
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| run | round | replaced this round | replaced so far | of which noisy | noisy captions fixed |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        share = f" ({100 * r['precision']:.0f}%)" if r["replaced_so_far"] else ""
        fixed = f"{r['replaced_noisy']} / {r['noisy']} ({100 * r['noisy_fixed']:.1f}%)" if r["noisy"] else "- (clean world)"
        lines.append(f"| {r['run']} | {r['round']} | {r['replaced_round']} | {r['replaced_so_far']} | "
                     f"{r['replaced_noisy']}{share} | {fixed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="metabolize.py output directories")
    args = parser.parse_args(argv)
    rows = [row for run in args.runs for row in audit(run)]
    print(render(rows))
    return rows


if __name__ == "__main__":
    main()
