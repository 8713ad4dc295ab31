"""The loop end to end on the smoke preset: lineage is complete, and a killed loop resumes at its round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from vlm_core.data.manifest import read_manifest
from vlm_core.loop.rounds import run_loop
from vlm_core.train.job import run_job

ROOT = Path(__file__).resolve().parents[3]


class Killed(Exception):
    pass


def test_lineage_complete_and_resume_at_the_killed_round(make_cfg) -> None:
    cfg = make_cfg(rounds=2, generators=["teacher"])
    calls: list[str] = []

    def dies_in_round_2(job):
        calls.append(job.run_dir)
        if "round-2" in job.run_dir:
            raise Killed  # the process "dies" during round 2's training
        return run_job(job, show_progress=False)

    with pytest.raises(Killed):
        run_loop(cfg, dies_in_round_2)
    out = Path(cfg.output_dir)
    assert (out / "round-1" / "DONE").is_file() and not (out / "round-2" / "DONE").is_file()
    assert len(json.loads((out / "rounds.json").read_text())) == 2

    resumed: list[str] = []

    def counting(job):
        resumed.append(job.run_dir)
        return run_job(job, show_progress=False)

    history = run_loop(cfg, counting)
    assert [Path(d).parent.name for d in resumed] == ["round-2"]  # rounds 0 and 1 were not redone
    assert [r["round"] for r in history] == [0, 1, 2]

    # Lineage: every row of round 2's mixture names its round and generator, and the file lists every source.
    manifest = out / "round-2" / "manifest.parquet"
    table = pq.read_table(manifest)
    decisions = [json.loads(d)["lineage"] for d in table.column("decisions").to_pylist()]
    sources = table.column("source").to_pylist()
    lineage = read_manifest(manifest).metadata["lineage"]
    for source, row in zip(sources, decisions):
        assert row == lineage[source] and {"round", "generator"} <= set(row)
    assert {"world", "r1_teacher", "r2_teacher"} == set(sources)
    assert {row["round"] for row in decisions} == {0, 1, 2}
    # The plan is the increment: round k's teacher rows per skill are what the sampler asked for (nothing was a duplicate).
    for k in (1, 2):
        produced = history[k]["generated"]["teacher"]["produced"]
        assert produced == {s: n for s, n in history[k]["plan"].items() if n}
        assert sum(history[k]["plan"].values()) == cfg.sampler.budget
        assert history[k]["curation"]["kept"][f"r{k}_teacher"] == cfg.sampler.budget
    assert (out / "report.md").is_file() and (out / "plots" / "accuracy.png").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_continuing_rounds_start_from_the_previous_weights(make_cfg) -> None:
    cfg = make_cfg(rounds=1, generators=["teacher"], strategy="none")
    history = run_loop(cfg, lambda job: run_job(job, show_progress=False))
    out = Path(cfg.output_dir)
    warm = json.loads((out / "round-1" / "train" / "warm-start" / "state.json").read_text())
    assert warm["completed_stages"] == ["tower", "align"]
    assert Path(warm["warm_start_from"]).parent.parent == out / "round-0" / "train"
    metrics = [json.loads(line) for line in (out / "round-1" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert {m["stage"] for m in metrics} <= {"instruct", "eval"}  # no tower or alignment in a continuing round
    assert history[1]["plan"] == {s: 0 for s in history[0]["scores"]}  # strategy none: nothing new
    assert history[1]["mixture"]["rows"] == {"world": history[0]["mixture"]["rows"]["world"]}


@pytest.mark.slow
def test_sigkilled_metabolize_resumes_at_its_round(smoke_cfg, tmp_path: Path) -> None:
    """The real entry point, killed with SIGKILL once round 0 is done, continues at round 1 when rerun."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "metabolize.py", "metabolize/preset=smoke", f"hydra.run.dir={run_dir}",
               f"job.data.cache_dir={smoke_cfg.job.data.cache_dir}", "job.train.threads=1", "generators=[teacher]", "rounds=1"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "round-0" / "DONE").is_file():
        assert process.poll() is None and time.time() < deadline, "metabolize.py ended before round 0 was done"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = {p.parent.name for p in run_dir.glob("round-*/DONE")}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr + result.stdout
    for name in finished_before:
        assert f"round {name.split('-')[1]}: done in an earlier run, skipped" in log
    history = json.loads((run_dir / "rounds.json").read_text())
    assert [r["round"] for r in history] == [0, 1]


def test_curation_refills_what_it_removed(make_cfg, monkeypatch) -> None:
    """Round 2's teacher repeats round 1's draws exactly; curation drops them all and a refill pass tops up the plan."""
    import vlm_core.loop.rounds as rounds

    monkeypatch.setattr(rounds, "teacher_seed", lambda loop_seed, round_index: 50_000)
    cfg = make_cfg(rounds=2, generators=["teacher"])
    history = run_loop(cfg, lambda job: run_job(job, show_progress=False))
    first, second = history[1]["curation"], history[2]["curation"]
    assert first["refill_passes"] == 0 and not first["removed"]
    repeated = sum(n for skill, n in history[2]["plan"].items() if n <= history[1]["plan"].get(skill, 0))
    assert second["removed"]["duplicate of pool or earlier sample"] >= repeated > 0
    assert second["refill_passes"] >= 1
    assert second["kept"]["r2_teacher"] == cfg.sampler.budget  # the full budget, every sample new
    out = Path(cfg.output_dir)
    rows = read_manifest(out / "round-2" / "increment-teacher.parquet", check_images=False).samples
    ids = [s.id for part in rows.values() for s in part]
    assert any(i.startswith("r2f1-") for i in ids) and len(set(ids)) == len(ids)
    assert (out / "round-2" / "near-features.npz").is_file()
    report = (out / "report.md").read_text()
    assert f"| 2 | r2_teacher {cfg.sampler.budget} | duplicate of pool or earlier sample: " in report


def test_self_augment_walks_the_pool_captions_one_window_a_round(make_cfg, monkeypatch) -> None:
    """Round k recaptions the pool's caption images (k-1)n .. kn-1: each round the next n, none skipped."""
    import vlm_core.loop.rounds as rounds

    asked: list[list[str]] = []

    def answerer(run_dir, cfg):
        def answer(samples):  # the pool's own captions: verified, and asked about exactly these images
            asked.append([s.id for s in samples])
            return [s.turns[-1].text for s in samples]

        return answer

    monkeypatch.setattr(rounds, "_model_answerer", answerer)
    cfg = make_cfg(rounds=3, generators=["teacher", "self_augment"])
    cfg.self_augment.images = 2
    run_loop(cfg, lambda job: run_job(job, show_progress=False))
    pool = pq.read_table(Path(cfg.output_dir) / "pool.parquet").to_pylist()
    captions = [row["id"] for row in pool if row["skill"] == "caption"]
    assert len(captions) >= 6
    assert asked == [captions[0:2], captions[2:4], captions[4:6]]


def test_specialists_train_on_their_skill_then_label_and_the_teacher_fills_the_rest(make_cfg) -> None:
    """generators=[teacher, specialist]: each specialist skill of the plan gets a model fine-tuned from round 0 on
    that skill alone; its labels join the increment, and the teacher makes up the rest of the budget."""
    cfg = make_cfg(rounds=1, generators=["teacher", "specialist"])
    cfg.specialist.verify = False  # keep every label of the barely trained model, so the test knows the counts
    jobs: list = []

    def recording(job):
        jobs.append(job)
        return run_job(job, show_progress=False)

    history = run_loop(cfg, recording)
    out = Path(cfg.output_dir)
    plan, generated = history[1]["plan"], history[1]["generated"]["specialist"]
    requested = {skill: int(0.5 * plan[skill] + 0.5) for skill in cfg.specialist.skills if plan.get(skill)}
    assert generated["requested"] == requested and requested
    assert set(generated["oracle_agreement"]) == set(requested)
    assert all(0.0 <= a <= 1.0 for a in generated["oracle_agreement"].values())
    specialists = {Path(j.run_dir).parent.name: j for j in jobs if "specialist-" in j.run_dir}
    assert set(specialists) == {f"specialist-{skill}" for skill in requested}
    pool = pq.read_table(out / "pool.parquet").to_pylist()
    for skill in requested:
        folder = out / "round-1" / f"specialist-{skill}"
        rows = pq.read_table(folder / "manifest.parquet").to_pylist()
        assert {r["skill"] for r in rows} == {skill} and len(rows) == sum(r["skill"] == skill for r in pool)
        warm = json.loads((folder / "train" / "warm-start" / "state.json").read_text())
        assert Path(warm["warm_start_from"]).parent.parent == out / "round-0" / "train"
        metrics = [json.loads(line) for line in (folder / "train" / "metrics.jsonl").read_text().splitlines()]
        assert {m["stage"] for m in metrics} == {"instruct"} and max(m["stage_step"] for m in metrics) == cfg.specialist.steps
        assert not (folder / "train" / "eval.json").exists()  # specialists are not evaluated
    kept = history[1]["curation"]["kept"]
    assert kept.get("r1_specialist", 0) == sum(generated["produced"].values()) > 0
    assert kept["r1_teacher"] + kept["r1_specialist"] == cfg.sampler.budget  # the teacher made up the difference
    pool_images = {image for row in pool for image in row["images"]}
    labelled = pq.read_table(out / "round-1" / "increment-specialist.parquet").to_pylist()
    assert all(set(row["images"]) <= pool_images for row in labelled)  # labels on pool images, no new ones
    assert {json.loads(row["decisions"])["lineage"]["generator"] for row in labelled} == {"specialist"}
    sources = set(pq.read_table(out / "round-1" / "manifest.parquet").column("source").to_pylist())
    assert sources == {"world", "r1_teacher", "r1_specialist"}
    assert "  - specialist labels the oracle accepts: " in (out / "report.md").read_text()
