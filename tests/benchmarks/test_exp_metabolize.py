"""benchmarks/exp_metabolize.py on the smoke preset: the arms share round 0, the results carry their header, table
and plot, and a longer run of the same work directory (``rounds=2``, its own ``--label``) resumes the finished
rounds instead of redoing them."""

from __future__ import annotations

import json

from benchmarks import exp_metabolize as exp


def _run(tmp_path, rounds: int, label: str) -> list[dict]:
    return exp.main(["--smoke", "--seeds", "0", "--strategies", "adaptive", "none", "--work", str(tmp_path / "work"),
                     "--name", "smoke", "--label", label, "--results", str(tmp_path / "results"), "--override",
                     f"job.data.cache_dir={tmp_path / 'cache'}", "job.train.threads=1", "generators=[teacher]",
                     f"rounds={rounds}"])


def test_smoke_arms_share_round0_and_a_longer_run_resumes(tmp_path):
    rows = _run(tmp_path, 1, "one")
    assert sorted(row["strategy"] for row in rows) == ["adaptive", "none"]
    assert len({row["mean_round0"] for row in rows}) == 1  # one round 0 for both arms
    text = (tmp_path / "results" / "metabolize_one.md").read_text()
    assert text.startswith("# Data-metabolism loop: adaptive vs uniform vs none (one)")
    assert "- command: `python benchmarks/exp_metabolize.py --smoke" in text and "- date:" in text
    assert "| adaptive | 0 |" in text and "| none | 0 |" in text
    assert (tmp_path / "results" / "metabolize_one.png").stat().st_size > 0
    assert "## Caption hallucination rate per round" in text and "| **none** | mean |" in text
    halluc = json.loads((tmp_path / "work" / "smoke" / "seed0" / "none" / "rounds.json").read_text())
    assert f"| none | 0 | {halluc[0]['caption_hallucination_rate']:.3f} | {halluc[1]['caption_hallucination_rate']:.3f} |" in text

    arm = tmp_path / "work" / "smoke" / "seed0" / "adaptive"
    done = (arm / "round-1" / "DONE").stat().st_mtime_ns
    rows = _run(tmp_path, 2, "two")
    assert (arm / "round-1" / "DONE").stat().st_mtime_ns == done  # resumed, not redone
    assert [r["round"] for r in json.loads((arm / "rounds.json").read_text())] == [0, 1, 2]
    assert (tmp_path / "results" / "metabolize_two.md").is_file() and (tmp_path / "results" / "metabolize_one.md").is_file()
