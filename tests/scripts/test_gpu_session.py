"""scripts/gpu_session.sh: each stage runs its steps within the budget and archives exactly what it produced,
checked on the CPU with the benchmarks' --smoke sizes in a copy of the repository (the stage writes into
benchmarks/results, which must not touch the checkout under test).

The stages run where the GPU image's Python lacks hydra, omegaconf, megatron-core, submitit and faiss
(DEVELOPERS.md; the device library's KINDS.md lists what it has): a ``sitecustomize`` on PYTHONPATH makes
those imports fail here too, so a stage that needs one fails in CI instead of in a 10-minute GPU call.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def copy(tmp_path):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    root = tmp_path / "repo"
    for name in filter(None, files.stdout.split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


# What the GPU image's Python does not have (top-level module names).
NOT_ON_THE_GPU_IMAGE = ("hydra", "hydra_plugins", "omegaconf", "megatron", "submitit", "faiss")

_BLOCKER = f'''import os
import sys
from importlib.machinery import PathFinder


class _NotOnTheGpuImage:
    """Refuses the imports the GPU image could not satisfy, but from the folders in GPU_IMAGE_CARRIED (where a
    stage installed carried wheels)."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in {NOT_ON_THE_GPU_IMAGE!r}:
            return None
        if path is not None:  # a submodule, searched in its package's folder: the package itself got through
            return None
        carried = [p for p in os.environ.get("GPU_IMAGE_CARRIED", "").split(os.pathsep) if p]
        spec = PathFinder.find_spec(name, carried) if carried else None
        if spec is None:
            raise ModuleNotFoundError(f"{{name}} is not on the GPU image (tests/scripts/test_gpu_session.py)")
        return spec


sys.meta_path.insert(0, _NotOnTheGpuImage())
'''


def _gpu_image_path(folder: Path) -> Path:
    """A PYTHONPATH entry whose sitecustomize refuses NOT_ON_THE_GPU_IMAGE."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(_BLOCKER)
    return folder


def _stage(root: Path, stage: str, **env) -> subprocess.CompletedProcess:
    blocker = _gpu_image_path(root.parent / "gpu_image_python")
    environ = dict(
        os.environ, GPU_SESSION_SMOKE="1", OUT=str(root / "out"), PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])),
        # hydra-core's pytest plugin is registered here but would import hydra
        PYTEST_ADDOPTS="-p no:hydra_pytest",
    )  # fmt: skip
    environ.update(env)
    return subprocess.run(["bash", "scripts/gpu_session.sh", stage], cwd=root, env=environ, capture_output=True,
                          text=True, timeout=600)


def test_fused_stage_archives_its_five_results_and_its_log(copy):
    proc = _stage(copy, "fused")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (copy / "out" / "fused.log").read_text()
    assert log.count(": exit 0") == 5, log
    with tarfile.open(copy / "out" / "fused.tar.gz") as tar:
        names = set(tar.getnames())
    ops = ("projector", "projector_gemms", "linear_cross_entropy", "norm_swiglu", "projector_layernorm")
    results = {f"benchmarks/results/{op}_smoke_cpu.md" for op in ops}
    assert results | {"./fused.log"} <= names
    assert not any(n.startswith("benchmarks/results/triton_compile") for n in names)  # only what this stage wrote


def test_check_stage_builds_the_extension_and_collects_the_kernel_tests(copy):
    # The stage runs the kernel tests; in CI they already run, so here only their collection is left to the
    # stage (a missing module fails collection), through PYTEST_ADDOPTS.
    proc = _stage(copy, "check", PYTEST_ADDOPTS="-p no:hydra_pytest --collect-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (copy / "out" / "check.log").read_text()
    # versions, build-ext, ext-probe, ext-tests, kernel-tests, kernel-tests-autotuned
    assert len(re.findall(r"^== [\w-]+: exit 0$", log, re.MULTILINE)) == 6, log
    assert "env VLM_TRITON_AUTOTUNE=first" in log and "-m gpu" in log
    gpu_only = re.search(r"^(\d+)/\d+ tests collected \((\d+) deselected\)", log, re.MULTILINE)
    assert gpu_only and int(gpu_only.group(1)) >= 20, log  # the real-size tests, marked by requires_cuda
    # with collection errors: "N errors"; the extension's tests are collected by a pytest of their own
    counts = [int(n) for n in re.findall(r"^(?:=+ )?(\d+) tests collected in ", log, re.MULTILINE)]  # -v: "=== N"
    assert len(counts) == 2 and min(counts) >= 20 and sum(counts) > 300, log


def test_train_stage_runs_bench_train_without_hydra_or_megatron(copy):
    proc = _stage(copy, "train")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (copy / "out" / "train.log").read_text()
    assert "== train: exit 0" in log, log
    with tarfile.open(copy / "out" / "train.tar.gz") as tar:
        assert any(n.startswith("benchmarks/results/train_") for n in tar.getnames()), tar.getnames()
        assert any(n.endswith("_profile.md") for n in tar.getnames()), tar.getnames()


def _carried_site(folder: Path) -> Path:
    """What `pip install --target` of .gpu-wheels makes, from this environment's own hydra, omegaconf and antlr4."""
    folder.mkdir()
    for module in ("hydra", "omegaconf", "antlr4"):
        spec = importlib.util.find_spec(module)
        (folder / module).symlink_to(Path(spec.origin).parent, target_is_directory=True)
    return folder


def test_e2e_stage_trains_with_carried_hydra_and_archives_the_run(copy, tmp_path):
    site = _carried_site(tmp_path / "site")
    runs = tmp_path / "gpu-e2e"
    proc = _stage(copy, "e2e", E2E_SITE=str(site), GPU_IMAGE_CARRIED=str(site), E2E_RUNS=str(runs),
                  GPU_WHEELS=str(tmp_path / "no-wheels"))
    log = (copy / "out" / "e2e.log").read_text()
    assert proc.returncode == 0 and "== train-small: exit 0" in log, log
    assert "train-default" not in log  # the full recipe only on the GPU
    with tarfile.open(copy / "out" / "e2e.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./e2e.log", "gpu-e2e/small/eval.json", "gpu-e2e/small/metrics.jsonl", "gpu-e2e/small/train.log"} <= names
    assert not any("/checkpoints/" in n or "/cache" in n for n in names), sorted(names)
    metrics = [json.loads(line) for line in (runs / "small" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("stage") == "instruct" for m in metrics)


def test_without_carried_hydra_the_e2e_stage_fails_where_the_gpu_image_would(copy, tmp_path):
    proc = _stage(copy, "e2e", E2E_SITE=str(tmp_path / "empty"), E2E_RUNS=str(tmp_path / "runs"),
                  GPU_WHEELS=str(tmp_path / "no-wheels"))
    log = (copy / "out" / "e2e.log").read_text()
    assert proc.returncode == 0, proc.stderr  # a failed step is logged, and the stage still archives
    assert "make gpu-wheels" in log
    assert "== train-small: exit 1" in log and "hydra is not on the GPU image" in log, log


@pytest.mark.parametrize("stage, step", [("attention", "attention"), ("attention64", "attention-dh64")])
def test_attention_stages_run_their_smoke_benchmark(copy, stage, step):
    proc = _stage(copy, stage)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (copy / "out" / f"{stage}.log").read_text()
    assert f"== {step}: exit 0" in log and "  ours full: ms " in log, log  # the figures are in the log too


@pytest.mark.parametrize("module", ["omegaconf", "megatron.core", "faiss"])
def test_the_stand_in_refuses_what_the_gpu_image_lacks(tmp_path, module):
    env = dict(os.environ, PYTHONPATH=str(_gpu_image_path(tmp_path / "gpu_image_python")))
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
    assert probe.returncode == 1 and "is not on the GPU image" in probe.stderr, probe.stderr
    ok = subprocess.run([sys.executable, "-c", "import yaml, torch"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_a_spent_budget_skips_the_steps_and_still_archives_the_log(copy):
    proc = _stage(copy, "fused", STAGE_BUDGET_S="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (copy / "out" / "fused.log").read_text()
    assert log.count("budget is spent") == 5 and "exit" not in log
    with tarfile.open(copy / "out" / "fused.tar.gz") as tar:
        assert tar.getnames() == ["./fused.log"]


def test_an_unknown_stage_is_refused(copy):
    proc = _stage(copy, "everything")
    assert proc.returncode == 2 and "usage: bash scripts/gpu_session.sh check|attention|attention64|fused|train" in proc.stderr


def test_e2e_small_run_is_the_small_run_of_the_train_tests():
    """The e2e stage's small overrides are a copy of tests/test_train_e2e.py's SMALL (bash cannot import it):
    the same, less the CPU thread count, and with the stage's own cache."""
    from tests.test_train_e2e import SMALL

    script = (REPO / "scripts" / "gpu_session.sh").read_text()
    body = re.search(r"^\s*small=\((.*?)\)$", script, re.MULTILINE | re.DOTALL).group(1)
    small = [word.strip('"') for word in body.split()]
    assert small == [o for o in SMALL if not o.startswith("train.threads=")] + ["data.cache_dir=$runs/cache"]
