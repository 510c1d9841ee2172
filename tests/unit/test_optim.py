"""Optimizers, weight-decay groups and schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llmtrain.optim import OptimConfig, Scheduler, SchedulerConfig, build_optimizer, lr_factor, param_groups


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))


def test_weight_decay_skips_biases_and_norms() -> None:
    groups = param_groups(_model(), 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) == 2 and len(no_decay["params"]) == 4


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("momentum", torch.optim.SGD),
                                      ("rmsprop", torch.optim.RMSprop), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW)])
def test_each_rule_builds_and_fits(name: str, cls: type) -> None:
    model = _model()
    opt = build_optimizer(OptimConfig(name=name, lr=0.01 if name != "sgd" else 0.05), model)
    assert type(opt) is cls
    if name == "momentum":
        assert opt.param_groups[0]["momentum"] == 0.9
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    first = None
    for _ in range(200):
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_schedules() -> None:
    cos = SchedulerConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cos, 0, 100) == pytest.approx(0.1)  # warmup: (0+1)/10
    assert lr_factor(cos, 9, 100) == pytest.approx(1.0)
    assert lr_factor(cos, 10, 100) == pytest.approx(1.0)
    assert lr_factor(cos, 55, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(cos, 100, 100) == pytest.approx(0.1)
    lin = SchedulerConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert [lr_factor(lin, s, 4) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = SchedulerConfig(name="constant", warmup_steps=2)
    assert [lr_factor(const, s, 10) for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_scheduler_sets_every_group_and_resumes() -> None:
    model = _model()
    opt = build_optimizer(OptimConfig(name="adamw", lr=1.0, weight_decay=0.1), model)
    sch = Scheduler(SchedulerConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0), opt, 1.0, 10)
    for _ in range(3):
        sch.step()
    assert all(g["lr"] == pytest.approx(0.7) for g in opt.param_groups)
    sch2 = Scheduler(SchedulerConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0), opt, 1.0, 10)
    sch2.load_state_dict(sch.state_dict())
    assert sch2.lr() == pytest.approx(0.7)
