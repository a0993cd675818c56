"""Optimizers, parameter groups and per-step schedules."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import OptimizerConfig, ScheduleConfig, TrainerConfig, _TrainStage
from pipeline.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups


def _model() -> tuple[nn.Module, nn.Module]:
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    head = nn.Linear(4, 3)
    return backbone, head


def test_param_groups_skip_decay_on_biases_and_norms():
    backbone, head = _model()
    groups = param_groups({"backbone": (backbone, 0.1), "head": (head, 1.0)}, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone.decay", "backbone.no_decay", "head.decay", "head.no_decay"}
    assert all(p.ndim >= 2 for p in by_name["backbone.decay"]["params"])
    assert by_name["backbone.no_decay"]["weight_decay"] == 0.0
    assert by_name["head.decay"]["weight_decay"] == 0.05
    assert by_name["backbone.decay"]["lr_scale"] == 0.1
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for m in (backbone, head) for p in m.parameters())


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_applies_lr_scale(name):
    backbone, head = _model()
    groups = param_groups({"backbone": (backbone, 0.1), "head": (head, 1.0)}, 0.0)
    opt = build_optimizer(OptimizerConfig(name=name), groups, lr=0.01, on_cuda=False)
    assert isinstance(opt, torch.optim.SGD if name == "sgd" else torch.optim.AdamW)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["backbone.decay"] == pytest.approx(0.001) and lrs["head.decay"] == pytest.approx(0.01)
    if name == "sgd":
        assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_linear_scaling_rule():
    assert OptimizerConfig(lr=0.1).scaled_lr(global_batch=512) == 0.1
    assert OptimizerConfig(lr=0.1, reference_batch_size=256).scaled_lr(global_batch=512) == pytest.approx(0.2)
    stage = _TrainStage(batch_size=64, accumulate_grad_batches=2, optimizer=OptimizerConfig(lr=0.1, reference_batch_size=256))
    assert stage.global_batch(world=4) == 512 and stage.lr(world=4) == pytest.approx(0.2)


def test_cosine_warmup_then_decays_to_min():
    cfg = ScheduleConfig(name="cosine", warmup_fraction=0.1, min_lr_ratio=0.01)
    values = [lr_multiplier(step, 100, cfg) for step in range(101)]
    assert values[0] < values[5] < values[9]  # warming up
    assert max(values) == pytest.approx(1.0, abs=0.01)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # then monotone decay
    assert values[100] == pytest.approx(0.01)


def test_constant_schedule():
    cfg = ScheduleConfig(name="constant")
    assert {lr_multiplier(s, 50, cfg) for s in range(50)} == {1.0}


@pytest.mark.parametrize("name", ["cosine", "onecycle", "constant"])
def test_scheduler_steps_without_error(name):
    backbone, head = _model()
    opt = build_optimizer(OptimizerConfig(), param_groups({"b": (backbone, 1.0), "h": (head, 1.0)}, 0.0), 0.01, False)
    sched = build_scheduler(opt, ScheduleConfig(name=name), total_steps=20)
    seen = []
    for _ in range(20):
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    if name == "constant":
        assert set(seen) == {0.01}
    else:
        assert max(seen) <= 0.01 + 1e-9 and seen[-1] < 0.01 / 5


@pytest.mark.parametrize("samples, batch, accumulate, world, expected", [
    (100, 10, 1, 1, 10), (101, 10, 1, 1, 11), (100, 10, 2, 1, 5), (100, 10, 1, 2, 5), (90, 16, 1, 2, 3),
    (7, 64, 1, 1, 1),
])
def test_steps_per_epoch(samples, batch, accumulate, world, expected):
    stage = _TrainStage(batch_size=batch, accumulate_grad_batches=accumulate)
    assert stage.steps_per_epoch(samples, world) == expected
    assert _TrainStage(epochs=3, batch_size=batch, accumulate_grad_batches=accumulate).total_steps(samples, world) \
        == 3 * expected


def test_world_size():
    assert TrainerConfig(num_nodes=2, devices=4).world_size == 8
