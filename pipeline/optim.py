"""Optimizers and per-step learning-rate schedules built from config.

Weight decay skips biases and norm weights (standard practice for both CNNs and ViTs).
Param groups carry an `lr_scale`, so the backbone can learn slower than a new head under
one schedule.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import OptimizerConfig, ScheduleConfig


def param_groups(named_modules: dict[str, tuple[nn.Module, float]], weight_decay: float) -> list[dict]:
    """{"backbone": (module, lr_scale), ...} -> optimizer groups split by decay / no decay."""
    groups = []
    for name, (module, lr_scale) in named_modules.items():
        params = [p for p in module.parameters()]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for suffix, members, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
            if members:
                groups.append({"params": members, "weight_decay": wd, "lr_scale": lr_scale, "name": f"{name}.{suffix}"})
    return groups


def build_optimizer(cfg: OptimizerConfig, groups: list[dict], lr: float, on_cuda: bool) -> torch.optim.Optimizer:
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    # The fused kernel does the whole update in one launch per group; CUDA only.
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=on_cuda or None)


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier on each group's base lr at optimizer step `step` (0-based)."""
    warmup = int(cfg.warmup_fraction * total_steps)
    if cfg.name == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
    if cfg.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=max(total_steps, 2),
            pct_start=max(cfg.warmup_fraction, 1e-3),
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
