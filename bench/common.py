"""Helpers every benchmark shares: the pretrain stage's module and data, hardware, quiet runs."""
from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterator

import torch

from pipeline.config import Config
from pipeline.data.tasks import TaskArrays
from pipeline.models.classifier import Classifier
from pipeline.optim import effective_lr
from pipeline.training import steps_per_epoch, world_size


def pretrain_classifier(cfg: Config, image_shape: tuple[int, int, int], num_classes: int, total_steps: int,
                        augment: bool = True) -> Classifier:
    """The module pipeline/stages/pretrain.py builds for objective `glyphs`, initialised from `cfg.seed`."""
    global_batch = cfg.pretrain.batch_size * cfg.pretrain.accumulate_grad_batches * world_size(cfg.trainer)
    torch.manual_seed(cfg.seed)
    return Classifier(
        model=cfg.pretrain.model.model_dump(),
        image_shape=image_shape,
        num_classes=num_classes,
        optimizer=cfg.pretrain.optimizer.model_dump(),
        schedule=cfg.pretrain.schedule.model_dump(),
        total_steps=total_steps,
        lr=effective_lr(cfg.pretrain.optimizer, global_batch),
        channels_last=cfg.trainer.channels_last,
        augment=augment,
    )


def pretrain_steps(cfg: Config, train: TaskArrays) -> int:
    return cfg.pretrain.epochs * steps_per_epoch(len(train.labels), cfg.pretrain, world_size(cfg.trainer))


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Swallow the stages' progress lines so the benchmark's own table stays readable."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer


class Stopwatch:
    def __init__(self, cuda: bool = False):
        self.cuda = cuda and torch.cuda.is_available()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def hardware() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(Exception):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                                  if line.startswith("Model name")), None)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
