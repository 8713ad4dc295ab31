"""curate end to end on a small dirty world: planted classes removed, accounting identity, outputs, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from curation import pipeline
from curation.config import CurateConfig, DirtyConfig, SourceConfig
from curation.pipeline import AccountingError, ShardResult, check_accounting, run_curation
from curation.sources.world.config import WORDS, WorldConfig
from curation.sources.world.dirty_writer import load_truth
from curation.truth import score_truth
from vlm_core.data.manifest import read_manifest

DIRTY = DirtyConfig(exact_dup=0.1, near_dup=0.1, wrong_caption=0.05, blank=0.05, corrupt=0.03, skew_factor=12.0,
                    bombs=1, path_escapes=3, bad_records=1, seed=11)


def _config(tmp_path: Path, output: str = "out", **overrides) -> CurateConfig:
    world = WorldConfig(train_per_skill=40, eval_per_skill=2)
    cfg = CurateConfig(
        sources={"world": SourceConfig(kind="dirty_world", world=world, dirty=DIRTY)},
        output_dir=str(tmp_path / output), cache_dir=str(tmp_path / "cache"), show_progress=False, **overrides,
    )
    cfg.balance.concepts = list(WORDS)
    return cfg


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("curate")
    cfg = _config(tmp_path)
    return cfg, run_curation(cfg), tmp_path


def test_planted_classes_are_removed_and_clean_kept(curated) -> None:
    _, result, _ = curated
    truth = result.report["truth"]["world"]
    recall = truth["recall"]
    for name in ("exact_dup", "blank", "corrupt", "bomb", "path_escape", "bad_record"):
        assert recall[name] == 1.0, (name, truth["classes"][name])
    assert recall["near_dup"] >= 0.9, truth["classes"]["near_dup"]
    assert truth["skew"]["excess_removed"] >= 0.8, truth["skew"]
    # Pixel embeddings (no pretrained tower in a fresh cache) and 320 clean records: a small, noisy world.
    assert truth["clean_removed_rate"] <= 0.05, truth["clean_removed_by_stage"]


def test_accounting_identity_and_outputs(curated) -> None:
    cfg, result, _ = curated
    counts = result.report["counts"]
    assert counts["ingested"] == counts["kept"] + counts["quarantined"] + counts["removed"]
    # Counted independently of the pipeline: truth.jsonl has one row per record the dirty world wrote.
    [source] = result.sources
    assert counts["ingested"] == len(load_truth(Path(source.lineage["truth"])))
    assert counts["removed"] == sum(counts["removed_by_stage"].values())
    out = Path(cfg.output_dir)
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert len(quarantine) == counts["quarantined"] and set(quarantine[0]) == {"source", "record", "reason"}
    assert len(removed) == counts["removed"] and all(row["reason"] for row in removed)
    manifest = read_manifest(out / "manifest.parquet")
    assert sum(len(rows) for rows in manifest.samples.values()) == counts["kept"]
    assert manifest.metadata["config_hash"] == result.config_hash and manifest.metadata["world"]["train_per_skill"] == 40
    report_md = (out / "report.md").read_text()
    assert "ingested = kept + quarantined + removed" in report_md
    for plot in ("cluster_sizes", "skills", "concepts", "duplicates"):
        assert (out / "plots" / f"{plot}.png").is_file(), plot
    assert json.loads((out / "report.json").read_text())["accounting"]["ok"] is True


def test_accounting_check_catches_a_lost_record(curated) -> None:
    _, result, _ = curated
    broken = pipeline.CurationResult(result.items, result.sources, result.stages, result.kept[1:], result.weights[1:],
                                     result.config_hash, result.output_dir)
    with pytest.raises(AccountingError, match="ingested"):
        check_accounting(broken)
    removed = next(iter(result.removed_by()))
    twice = pipeline.CurationResult(result.items, result.sources, result.stages, np.append(result.kept, removed),
                                    np.append(result.weights, 1.0), result.config_hash, result.output_dir)
    with pytest.raises(AccountingError, match="both kept and removed"):
        check_accounting(twice)


def test_score_truth_counts_a_kept_planted_record_as_missed() -> None:
    truth = [{"index": 0, "id": "a", "class": "clean"}, {"index": 1, "id": "b", "class": "exact_dup"},
             {"index": 2, "id": "c", "class": "exact_dup"}, {"index": 3, "id": None, "class": "bad_record"},
             {"index": 4, "id": "e", "class": "clean"}]
    outcome = {"b": ("exact", "exact duplicate of w/a (same pixels)"), "#3": ("quarantine", "line 4: invalid JSON"),
               "e": ("near", "near duplicate of w/a (text similarity 0.9)")}
    report = score_truth(truth, outcome, {"a", "c"}, {}, "w")
    assert report["recall"] == {"exact_dup": 0.5, "bad_record": 1.0}
    assert report["clean_removed"] == 1 and report["clean_removed_natural_duplicates"] == 1
    with pytest.raises(ValueError, match="neither kept nor removed"):
        score_truth(truth, outcome, {"a"}, {}, "w")  # c is lost


def test_a_killed_run_resumes_from_its_finished_stages(curated, monkeypatch: pytest.MonkeyPatch) -> None:
    _, reference, tmp_path = curated
    cfg = _config(tmp_path, output="resumed")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during the quality stage")

    monkeypatch.setattr(pipeline, "quality_filter", crash)
    with pytest.raises(KeyboardInterrupt):
        run_curation(cfg)
    stages = Path(cfg.output_dir) / "stages"
    finished = {path.name: path.stat().st_mtime_ns for path in stages.glob("*.npz")}
    assert set(finished) == {"exact.npz", "near.npz", "semantic.npz"}
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(pipeline, "semantic_dedup", lambda *a, **k: calls.append(1))  # must not run again
    result = run_curation(cfg)
    assert not calls
    assert {name: (stages / name).stat().st_mtime_ns for name in finished} == finished
    assert np.array_equal(result.kept, reference.kept)
    assert result.report["counts"] == reference.report["counts"]


def test_changed_config_recomputes_only_from_the_changed_stage(curated) -> None:
    _, reference, tmp_path = curated
    cfg = _config(tmp_path, output="resumed2")
    run_curation(cfg)
    stages = Path(cfg.output_dir) / "stages"
    before = {path.name: path.stat().st_mtime_ns for path in stages.glob("*.npz")}
    cfg.balance.cap = 3.0
    result = run_curation(cfg)
    after = {path.name: path.stat().st_mtime_ns for path in stages.glob("*.npz")}
    assert all(after[name] == before[name] for name in ("exact.npz", "near.npz", "semantic.npz", "quality.npz"))
    assert after["balance.npz"] != before["balance.npz"]
    assert result.report["counts"]["removed_by_stage"]["balance"] <= reference.report["counts"]["removed_by_stage"]["balance"]


def test_semantic_dedup_split_across_shard_jobs_equals_one_run(curated, caplog: pytest.LogCaptureFixture) -> None:
    _, _, tmp_path = curated
    one = _config(tmp_path, output="unsharded")
    one.semantic.epsilon, one.semantic.epsilons = 0.3, [0.1]  # loose: the small world has pairs to remove
    reference = run_curation(one)
    cfg = _config(tmp_path, output="sharded")
    cfg.semantic.epsilon, cfg.semantic.epsilons, cfg.semantic.shards = 0.3, [0.1], 3
    stages = Path(cfg.output_dir) / "stages"
    for shard in (0, 2):  # shard 1's job never ran
        cfg.semantic.shard = shard
        done = run_curation(cfg)
        assert isinstance(done, ShardResult) and done.path == stages / f"semantic-pairs-{shard}-of-3.npz"
        assert not (Path(cfg.output_dir) / "manifest.parquet").exists()  # a shard job stops after its search
    clustering = (stages / "semantic-clusters.npz").stat().st_mtime_ns  # clustered once, by the first job
    cfg.semantic.shard = None
    with caplog.at_level("WARNING", logger="curation.semantic_shards"):
        result = run_curation(cfg)
    assert "shard(s) [1] of 3" in caplog.text  # the merging run searched the missing shard itself, and said so
    assert (stages / "semantic-clusters.npz").stat().st_mtime_ns == clustering
    assert (stages / "semantic-pairs-1-of-3.npz").is_file()
    assert result.report["counts"] == reference.report["counts"]
    assert np.array_equal(result.kept, reference.kept)
    semantic = next(r for r, _ in result.stages if r.stage == "semantic")
    expected = next(r for r, _ in reference.stages if r.stage == "semantic")
    assert semantic.removed == expected.removed and semantic.summary == expected.summary
    assert len(semantic.removed) > 0  # the searches found pairs, the same ones, and removed the same items
    assert np.array_equal(semantic.columns["max_similarity"], expected.columns["max_similarity"])


def test_a_stale_shard_file_is_searched_again(curated) -> None:
    _, reference, tmp_path = curated
    cfg = _config(tmp_path, output="stale")
    cfg.semantic.shards = 2
    stages = Path(cfg.output_dir) / "stages"
    stages.mkdir(parents=True)
    fake = {"key": np.array("another run"), "later": np.array([5]), "earlier": np.array([1]),
            "similarity": np.array([1.0], np.float32)}  # fmt: skip
    np.savez(stages / "semantic-pairs-0-of-2.npz", **fake)
    result = run_curation(cfg)
    assert result.report["counts"] == reference.report["counts"]
    with np.load(stages / "semantic-pairs-0-of-2.npz") as saved:
        assert str(saved["key"]) != "another run"
