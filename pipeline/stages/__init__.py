"""The stages, in an order that respects dvc.yaml's dependencies. Each module exposes `run(cfg: Config) -> dict`."""
from __future__ import annotations

import importlib
from collections.abc import Callable

STAGES = ("prepare", "corpus", "pretrain", "finetune", "evaluate")


def stage_runner(name: str) -> Callable:
    run = importlib.import_module(f"pipeline.stages.{name}").run

    def checked(cfg):
        from pipeline.storage import check_buckets

        # A missing or forbidden S3 bucket is exit 2 before any compute, not after an hour of training.
        stage_paths = [n for n in type(cfg.paths).model_fields if n != "root" and n not in cfg.paths.UNROOTED]
        check_buckets([cfg.data.source, cfg.pretrain.source, *(cfg.paths.uri(n) for n in stage_paths)])
        return run(cfg)

    return checked
