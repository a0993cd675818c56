"""The four stages, in dependency order. Each module exposes `run(cfg: Config) -> dict`."""
from __future__ import annotations

import importlib
from collections.abc import Callable

STAGES = ("prepare", "pretrain", "finetune", "evaluate")


def stage_runner(name: str) -> Callable:
    return importlib.import_module(f"pipeline.stages.{name}").run
