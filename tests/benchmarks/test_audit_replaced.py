"""benchmarks/audit_replaced.py: replacements are counted per round and as a union, checked against the world's
record of which captions are noisy, and a malformed record is named."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks import audit_replaced


def _run(tmp_path, metas: dict[str, dict], replaced: list[list[str]]):
    run = tmp_path / "run"
    run.mkdir()
    ids = list(metas)
    pq.write_table(pa.table({"id": ids + ["train-count-000000"], "skill": ["caption"] * len(ids) + ["count"],
                             "meta": [json.dumps(metas[i]) for i in ids] + ["{}"]}), run / "pool.parquet")
    for k, ids_k in enumerate(replaced, start=1):
        (run / f"round-{k}").mkdir()
        (run / f"round-{k}" / "replaced.json").write_text(json.dumps(ids_k))
    return run


def test_counts_the_union_and_checks_it_against_the_noisy_captions(tmp_path):
    metas = {"a": {"caption_from": "b"}, "b": {}, "c": {"caption_from": "a"}, "d": {"caption_from": "c"}}
    run = _run(tmp_path, metas, [["a"], ["a", "b"], []])
    rows = audit_replaced.audit(run)
    assert [(r["replaced_round"], r["replaced_so_far"], r["replaced_noisy"]) for r in rows] == [(1, 1, 1), (2, 2, 1), (0, 2, 1)]
    assert rows[1]["precision"] == 0.5 and rows[2]["noisy_fixed"] == pytest.approx(1 / 3)
    assert rows[0]["captions"] == 4 and rows[0]["noisy"] == 3
    text = audit_replaced.render(rows)
    assert "| 2 | 2 | 2 | 1 (50%) | 1 / 3 (33.3%) |" in text


def test_a_clean_world_and_malformed_input_are_reported(tmp_path):
    run = _run(tmp_path, {"a": {}}, [[]])
    assert "- (clean world)" in audit_replaced.render(audit_replaced.audit(run))
    pq.write_table(pa.table({"id": ["x"], "skill": ["caption"], "meta": ["{not json"]}), run / "pool.parquet")
    with pytest.raises(ValueError, match=r"pool.parquet: record 'x', field 'meta'"):
        audit_replaced.audit(run)
    with pytest.raises(FileNotFoundError, match="no pool.parquet"):
        audit_replaced.audit(tmp_path)
