"""``python curate.py -m semantic.shards=2 semantic.shard=0,1 hydra/launcher=submitit_slurm``: semantic dedup
split by cluster into one Slurm job per shard, started together on the loopback cluster (the first clusters
under the lock, the other waits and reads it), then merged by a local run. The curated result equals that of
one unsharded run of the same world."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORLD = ["sources.world.world.train_per_skill=60", "semantic.epsilon=0.3", "semantic.epsilons=[0.1]",
         "show_progress=false"]  # fmt: skip  (loose epsilon: the small world has semantic pairs to remove)

pytestmark = pytest.mark.slow


def curate(*overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "curate.py", *(["-m"] if multirun else []), *WORLD, *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_semantic_shards_run_as_slurm_jobs_and_merge_to_the_unsharded_result(slurm_cluster: str, tmp_path: Path):
    cache = f"cache_dir={tmp_path / 'cache'}"
    curate(cache, f"output_dir={tmp_path / 'one'}", f"hydra.run.dir={tmp_path / 'run-one'}")
    sweep = tmp_path / "sweep"
    jobs = curate(cache, f"output_dir={tmp_path / 'sharded'}", "semantic.shards=2", "semantic.shard=0,1",
                  f"hydra.sweep.dir={sweep}", f"hydra.launcher.submitit_folder={sweep}/submitit/%j",
                  "hydra/launcher=submitit_slurm", f"hydra.launcher.partition={slurm_cluster}",
                  "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1", multirun=True)  # fmt: skip
    stages = tmp_path / "sharded" / "stages"
    assert sorted(p.name for p in stages.glob("semantic-pairs-*")) == ["semantic-pairs-0-of-2.npz", "semantic-pairs-1-of-2.npz"]
    assert not (tmp_path / "sharded" / "manifest.parquet").exists(), jobs.stdout[-2000:]  # the jobs only searched
    merged = curate(cache, f"output_dir={tmp_path / 'sharded'}", "semantic.shards=2", f"hydra.run.dir={tmp_path / 'run-merge'}")
    assert "searching them in this run" not in merged.stdout + merged.stderr  # both shards came from the jobs
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    sharded = json.loads((tmp_path / "sharded" / "report.json").read_text())
    assert sharded["counts"] == one["counts"]
    assert sharded["counts"]["removed_by_stage"]["semantic"] > 0
    removed = [(tmp_path / run / "removed.jsonl").read_text().splitlines() for run in ("one", "sharded")]
    assert sorted(removed[0]) == sorted(removed[1])  # the same records, for the same reasons
