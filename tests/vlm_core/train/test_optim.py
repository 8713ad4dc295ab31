from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlm_core.train.optim import build_optimizer, implementation, keep_implementation, lr_at


def test_schedule_warmup_peak_and_floor() -> None:
    lrs = [lr_at(s, 1e-3, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warmup
    assert lr_at(100, 1e-3, 10, 100, 0.1) == pytest.approx(1e-4)
    mid = lr_at(55, 1e-3, 10, 100, 0.1)
    assert mid == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision = nn.Linear(4, 4)
        self.decoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))


def test_build_optimizer_freezes_and_groups() -> None:
    model = Toy()
    optimizer = build_optimizer(model, ["decoder"], 1e-3, 0.1, (0.9, 0.95))
    assert not any(p.requires_grad for p in model.vision.parameters())
    decay, no_decay = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 3  # linear bias, norm weight, norm bias


def test_build_optimizer_unknown_module() -> None:
    with pytest.raises(ValueError, match="projector"):
        build_optimizer(Toy(), ["projector"], 1e-3, 0.0, (0.9, 0.95))


def test_cpu_update_is_the_per_parameter_one_bit_for_bit() -> None:
    """build_optimizer leaves the CPU's AdamW to torch: the per-parameter update the bit-exact resume tests
    were written against (fused is for CUDA: test_fused_where_every_parameter_is_on_cuda)."""
    torch.manual_seed(0)
    models = [Toy(), Toy()]
    models[1].load_state_dict(models[0].state_dict())
    ours = build_optimizer(models[0], ["vision", "decoder"], 1e-2, 0.1, (0.9, 0.95))
    groups = build_optimizer(models[1], ["vision", "decoder"], 1e-2, 0.1, (0.9, 0.95)).param_groups
    single = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                               lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for step in range(3):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        for model, optimizer in zip(models, (ours, single)):
            optimizer.zero_grad()
            model.decoder(model.vision(x)).square().sum().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_fused_where_every_parameter_is_on_cuda() -> None:
    from types import SimpleNamespace

    def on(*devices):
        return [SimpleNamespace(device=torch.device(d)) for d in devices]

    assert implementation(on("cuda", "cuda:0")) == {"fused": True}
    assert implementation(on("cuda", "cpu")) == {}  # torch's fused AdamW wants one device type
    assert implementation(on("cpu")) == {} and implementation([]) == {}
    groups = build_optimizer(Toy(), ["vision", "decoder"], 1e-2, 0.1, (0.9, 0.95)).param_groups
    assert all(not g["fused"] for g in groups)  # on the CPU: torch's default


def test_loading_keeps_the_running_optimizers_implementation() -> None:
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, 2))]
    fused = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.5}], fused=True)
    saved = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.5}], lr=0.25,
                              foreach=False).state_dict()
    merged = keep_implementation(fused, saved)
    assert [g["fused"] for g in merged["param_groups"]] == [True, True]
    assert [g["foreach"] for g in merged["param_groups"]] == [None, None]
    assert [(g["lr"], g["weight_decay"]) for g in merged["param_groups"]] == [(0.25, 0.01), (0.25, 0.5)]
    assert saved["param_groups"][0]["foreach"] is False  # the caller's dict is left as it was
    with pytest.raises(ValueError, match="2 param groups; this optimizer has 1"):
        keep_implementation(torch.optim.AdamW(params), saved)
