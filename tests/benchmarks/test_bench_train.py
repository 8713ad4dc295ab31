"""benchmarks/bench_train.py in its CPU smoke mode: it runs both providers, they compute the same loss, and
the table carries the header STYLE.md asks for; the FLOP formula counts what the docstring says."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_train as bench
from vlm_core.model.vlm import VLM
from vlm_core.types import TokenizedSample


def test_smoke_run_writes_the_table(tmp_path):
    path = bench.main(["--smoke", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out"),
                       "--precision", "fp32"])
    text = path.read_text()
    for field in ("device:", "date:", "commit:", "versions:", "command:"):
        assert f"- {field}" in text
    agreement = float(text.split("loss |ours - hf| on the first batch in fp32: ")[1].split()[0])
    assert agreement < 1e-5, f"ours and HF's LLaVA do not compute the same loss: {agreement}"
    rows = [dict(zip(bench.COLUMNS, (cell.strip() for cell in line.strip("|").split("|"))))
            for line in text.splitlines() if line.startswith("| tiny |")]
    assert sorted((row["mode"], row["provider"]) for row in rows) == [
        ("forward", "hf"), ("forward", "ours"), ("full", "hf"), ("full", "ours")]
    assert all(float(row["x vs hf"]) > 0 for row in rows if row["provider"] == "ours")
    assert all(float(row["tokens/s"].replace(",", "")) > 0 for row in rows)


def test_model_flops_formula():
    cfg = bench.model_config("tiny")
    model = VLM(cfg, vocab_size=100, image_token_id=99)
    length, supervised, P = 20, 5, cfg.vision.num_patches
    mask = torch.zeros(length, dtype=torch.bool)
    mask[-supervised:] = True
    sample = TokenizedSample(torch.zeros(length, dtype=torch.long), mask, torch.zeros(length, dtype=torch.int32),
                             torch.zeros(1, 3, 48, 48))
    v = cfg.vision
    vision = 2 * (v.channels * v.patch_size**2 * v.dim + v.layers * (4 * v.dim**2 + 2 * v.dim * v.mlp_hidden)) * P
    vision += 4 * v.layers * v.dim * P**2
    projector = 6 * (v.dim * cfg.projector_hidden + cfg.projector_hidden * cfg.dim) * P
    kv = cfg.kv_heads * cfg.head_dim
    decoder = 6 * cfg.layers * (2 * cfg.dim**2 + 2 * cfg.dim * kv + 3 * cfg.dim * cfg.mlp_hidden) * length
    attention = 3 * 4 * cfg.layers * cfg.dim * length * (length + 1) // 2
    head = 6 * cfg.dim * 100 * supervised
    assert bench.model_flops(cfg, model, [sample], "full") == vision + projector + decoder + attention + head


def test_profile_lists_where_a_step_goes(tmp_path):
    bench.main(["--smoke", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out"),
                "--precision", "fp32", "--providers", "ours", "--modes", "full", "--profile", "2", "--profile-top", "5"])
    text = next((tmp_path / "out").glob("*_profile.md")).read_text()
    assert "- profiled: 2 full steps of ours" in text
    assert "- commit:" in text
    ops = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| op |")]
    assert len(ops) == 5, text
    self_ms = [float(line.split("|")[3]) for line in ops]
    assert self_ms == sorted(self_ms, reverse=True) and self_ms[0] > 0
    assert any("aten::" in line for line in ops)  # CPU ops: no GPU here


def test_union_of_kernel_intervals():
    # overlapping, nested, touching and disjoint intervals (microseconds) -> ms
    assert bench._union_ms([(0, 10), (5, 15), (6, 7), (15, 20), (30, 40)]) == 0.030
    assert bench._union_ms([]) == 0.0


def test_batch_sweep_gives_rows_per_batch_and_survives_out_of_memory(tmp_path, monkeypatch):
    """Several batch sizes: rows for each; a provider that runs out of GPU memory at one (simulated: HF's step
    raises torch.OutOfMemoryError from batch 8 on) gets a row that says so and is not run at larger ones,
    while ours goes on."""
    real_step_fns = bench.step_fns
    hf_steps = []

    def failing_hf(*args, **kwargs):
        fns = real_step_fns(*args, **kwargs)
        prepare, step = fns["hf"]

        def step_or_oom(inputs):
            hf_steps.append(inputs["input_ids"].shape[0])
            if inputs["input_ids"].shape[0] >= 8:
                raise torch.OutOfMemoryError("simulated")
            step(inputs)

        return {**fns, "hf": (prepare, step_or_oom)}

    monkeypatch.setattr(bench, "step_fns", failing_hf)
    path = bench.main(["--smoke", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out"),
                       "--precision", "fp32", "--modes", "full", "--batch-size", "4", "8", "12"])
    text = path.read_text()
    rows = [dict(zip(bench.COLUMNS, (cell.strip() for cell in line.strip("|").split("|"))))
            for line in text.splitlines() if line.startswith("| tiny |")]
    by = {(row["batch"], row["provider"]): row for row in rows}
    assert sorted(by) == [(b, p) for b in ("12", "4", "8") for p in ("hf", "ours")]
    assert all(float(by[b, "ours"]["tokens/s"].replace(",", "")) > 0 for b in ("4", "8", "12"))
    assert float(by["4", "ours"]["x vs hf"]) > 0 and by["8", "ours"]["x vs hf"] == ""
    assert by["8", "hf"]["note"] == "out of GPU memory" and by["8", "hf"]["tokens/s"] == ""
    assert by["12", "hf"]["note"] == "not run: out of GPU memory at batch 8, full"
    assert 12 not in hf_steps and hf_steps.count(8) == 1  # dropped at its first failure
    real_tokens = [float(by[b, "ours"]["real tokens/step"]) for b in ("4", "8", "12")]
    assert real_tokens[0] < real_tokens[1] < real_tokens[2]


def test_batch_sizes_are_checked():
    for bad in (["0"], ["8", "8"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--batch-size", *bad])


def test_profile_report_states_gpu_busy_share_and_kernel_count():
    # the GPU branch of the report, from figures a GPU run would give: 2 steps, 300 ms wall, 120 ms busy, 4,000
    # kernels -> 40% busy, 2,000 kernels a step, 30 us each on average
    ops = [{"op": "aten::mm", "calls": 20, "self ms / step": 30.0, "share": 0.5}]
    text = bench.profile_report(bench.Profile(2, 300.0, 120.0, 4000, ops), ["device: H100"], "train_small_cuda")
    assert "- GPU busy: 60.0 ms per step, 40% of the wall time" in text
    assert "idle 60%" in text
    assert "- GPU kernels: 2,000 per step (copies and fills included), 30.0 us of busy time each" in text
    assert "| aten::mm | 10 | 30.000 | 50.0% |" in text
    cpu = bench.profile_report(bench.Profile(2, 300.0, None, None, ops), ["device: CPU"], "train_tiny_cpu")
    assert "GPU" not in cpu.replace("on the CPU", "") and "share of CPU time" in cpu
