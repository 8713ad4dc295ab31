"""model.kernel_impl: the fused kernels in a real training loop, and how the choice is resolved and logged."""

from __future__ import annotations

import functools
import json
import logging

import pytest
import torch
from kernel_checks import CUDA, DEVICE, generator

from vlm_core import kernels
from vlm_core.data.packing import pack
from vlm_core.model.config import ModelConfig, VisionConfig
from vlm_core.model.vlm import VLM
from vlm_core.train.lm import lm_loss, summarize_lm
from vlm_core.train.loop import LoopContext, StageSpec, run_stage
from vlm_core.train.metrics import MetricsLogger
from vlm_core.train.optim import build_optimizer
from vlm_core.types import TokenizedSample

VOCAB, IMAGE = 64, 3


def config(kernel_impl: str, projector_layer_norm: bool = False) -> ModelConfig:
    vision = VisionConfig(image_size=32, patch_size=16, dim=32, layers=1, heads=2)  # P = 4
    return ModelConfig(vision=vision, dim=64, layers=2, heads=4, kv_heads=2, init_std=0.1, kernel_impl=kernel_impl,
                       projector_layer_norm=projector_layer_norm)  # fmt: skip


def batches():
    """Two packed micro-batches (vlm_core.data.packing.pack): images at the start, middle and end of
    samples, two images back to back, padding segments."""
    g = generator("kernel-impl-batches")

    def sample(spans):
        ids, groups, images = [], [], 0
        for kind, n in spans:
            if kind == "t":
                ids.append(torch.randint(IMAGE + 1, VOCAB, (n,), generator=g))
                groups.append(torch.zeros(n, dtype=torch.int32))
            else:
                images += 1
                ids.append(torch.full((4,), IMAGE))
                groups.append(torch.full((4,), images, dtype=torch.int32))
        input_ids = torch.cat(ids)
        loss_mask = (input_ids != IMAGE) & (torch.rand(input_ids.numel(), generator=g) < 0.7)
        return TokenizedSample(input_ids, loss_mask, torch.cat(groups), torch.randn(images, 3, 32, 32, generator=g))

    first = [[("i", 1), ("t", 9)], [("t", 5), ("i", 1), ("t", 6), ("i", 1), ("i", 1), ("t", 4)], [("t", 7), ("i", 1)]]
    second = [[("t", 13), ("i", 1), ("t", 20)], [("i", 1), ("t", 11)]]
    return [pack([sample(s) for s in first], row_len=64).to(DEVICE), pack([sample(s) for s in second], row_len=61).to(DEVICE)]


class FixedBatches:
    def __init__(self, micro_batches):
        self.micro_batches = micro_batches

    def next_step(self):
        return self.micro_batches

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def train_losses(kernel_impl: str, run_dir, projector_layer_norm: bool = False) -> list[float]:
    torch.manual_seed(0)
    model = VLM(config(kernel_impl, projector_layer_norm), vocab_size=VOCAB, image_token_id=IMAGE).to(DEVICE)
    optimizer = build_optimizer(model, ["vision", "projector", "decoder"], 3e-3, 0.01, (0.9, 0.95))
    logger = MetricsLogger(run_dir, tensorboard=False)
    context = LoopContext(run_dir=run_dir, logger=logger, device=torch.device(DEVICE), bf16=False, log_every=1,
                          ckpt_every=0, keep_checkpoints=1, checkpoint_state=dict, show_progress=False)  # fmt: skip
    spec = StageSpec("instruct", 3, 0, lr=3e-3, warmup_steps=1, min_lr_ratio=0.1, grad_clip=1.0)
    loss_fn = functools.partial(lm_loss, per_sample=True)
    run_stage(spec, model, optimizer, FixedBatches(batches()), loss_fn, summarize_lm, context)
    logger.close()
    assert set(model.decoder.kernel_impls.values()) == {kernel_impl}, model.decoder.kernel_impls
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("projector_layer_norm", [False, True])
def test_training_with_the_fused_kernels_follows_the_reference(tmp_path, projector_layer_norm):
    """Every fused op at once (RMSNorm, SwiGLU, RoPE, projector merge, linear + CE), 3 AdamW steps; with
    and without the projector's LayerNorm (fused into GEMM 1's loads)."""
    reference = train_losses("reference", tmp_path / "reference", projector_layer_norm)
    fused = train_losses("triton", tmp_path / "triton", projector_layer_norm)
    assert reference[-1] < reference[0] - 0.05, f"the run does not learn, so the test could not fail: {reference}"
    # Both runs are float32 with different summation orders: 8 fp32 ulps of the loss (~4e-6 at 4.4), as
    # tests/vlm_core/model/test_attn_impl_training.py allows. A wrong gradient in any op changes steps 2
    # and 3 through AdamW's first update, which moves every weight by ~lr = 3e-3.
    bound = 8 * torch.finfo(torch.float32).eps * max(reference)
    errors = [abs(a - b) for a, b in zip(fused, reference)]
    assert max(errors) <= bound, f"losses {fused} vs reference {reference}; max err {max(errors):.3e}, bound {bound:.3e}"


def records(caplog, level=None):
    return [r.getMessage() for r in caplog.records
            if r.name == "vlm_core.kernels.fused" and (level is None or r.levelno == level)]  # fmt: skip


def test_resolved_once_per_device_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="vlm_core.kernels")
    model = VLM(config("auto"), vocab_size=VOCAB, image_token_id=IMAGE).to(DEVICE)
    with torch.no_grad():
        model(batches()[0])
        model(batches()[0])
    assert len(records(caplog)) == 1, records(caplog)
    if not CUDA:
        assert records(caplog) == ["fused kernels: kernel_impl=auto -> reference on cpu (no fused kernel is used on cpu)"]
        assert set(model.decoder.kernel_impls.values()) == {"reference"}
        assert {block.mlp.kernel_impl for block in model.decoder.layers} == {"reference"}


def test_triton_that_cannot_run_falls_back_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(kernels, "kernel_impl_status", lambda name, device: (name == "reference", "no triton in this test"))
    caplog.set_level(logging.INFO, logger="vlm_core.kernels")
    model = VLM(config("triton"), vocab_size=VOCAB, image_token_id=IMAGE)
    assert set(model.decoder.select_kernels(torch.device("cpu")).values()) == {"reference"}
    assert records(caplog, logging.WARNING) == [
        "fused kernels: kernel_impl=triton cannot run on cpu: no triton in this test; falling back to kernel_impl=reference"
    ]
    assert model.decoder.layers[0].attention_norm.kernel_impl == "reference"


@pytest.mark.usefixtures("triton_kernels")
def test_an_op_the_model_cannot_fuse_falls_back_alone(caplog):
    class ShardedLinear(torch.nn.Linear):
        """Stands in for a tensor-parallel layer: not a plain nn.Linear."""

    caplog.set_level(logging.INFO, logger="vlm_core.kernels")
    torch.manual_seed(0)
    model = VLM(config("triton"), vocab_size=VOCAB, image_token_id=IMAGE).to(DEVICE)
    fc1 = model.projector.fc1
    model.projector.fc1 = ShardedLinear(fc1.in_features, fc1.out_features).to(DEVICE)
    with torch.no_grad():
        model(batches()[0])
    impls = model.decoder.kernel_impls
    assert impls["projector"] == "reference" and impls["rmsnorm"] == impls["linear_cross_entropy"] == "triton"
    assert records(caplog, logging.WARNING) == [
        ("fused kernels: projector cannot use kernel_impl=triton: projector.fc1 is ShardedLinear, not a plain nn.Linear; "
         "falling back to reference")
    ]


def test_config_rejects_an_unknown_kernel_impl():
    with pytest.raises(ValueError, match="model.kernel_impl='magic'"):
        config("magic")
