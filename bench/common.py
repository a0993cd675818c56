"""Helpers every benchmark shares: the pretrain stage's module and data, hardware, quiet runs."""
from __future__ import annotations

import contextlib
import io
import itertools
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.data.tasks import TaskArrays
from pipeline.data.stream import to_float
from pipeline.models.augment import random_affine
from pipeline.models.classifier import Classifier


def pretrain_classifier(cfg: Config, image_shape: tuple[int, int, int], num_classes: int, total_steps: int,
                        augment: bool = True) -> Classifier:
    """The module pipeline/stages/pretrain.py builds for objective `glyphs`, initialised from `cfg.seed`."""
    torch.manual_seed(cfg.seed)
    return Classifier(
        model=cfg.pretrain.model.model_dump(),
        image_shape=image_shape,
        num_classes=num_classes,
        optimizer=cfg.pretrain.optimizer.model_dump(),
        schedule=cfg.pretrain.schedule.model_dump(),
        total_steps=total_steps,
        lr=cfg.pretrain.lr(cfg.trainer.world_size),
        channels_last=cfg.trainer.channels_last,
        augment=augment,
    )


def raw_training_steps(module: Classifier, batches: Iterable, device: torch.device,
                       bf16: bool = False) -> Iterator[torch.Tensor]:
    """fit()'s training step written out in plain PyTorch, epoch after epoch; yields each step's loss.

    The module's own step in the same order: augment (if the module does) -> forward and
    cross-entropy (under bf16 autocast if asked, as Lightning's precision context would) -> the
    accuracy it logs -> zero_grad -> backward -> optimizer step -> schedule step. The
    benchmarks' hand-written side: parity (losses) and bench.gpu (throughput).
    """
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for epoch in itertools.count():
        if callable(getattr(getattr(batches, "sampler", None), "set_epoch", None)):
            batches.sampler.set_epoch(epoch)  # as Lightning does before each epoch
        for images, labels in batches:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            images = to_float(images)  # uint8 on a GPU, as fit() does it (Classifier.on_after_batch_transfer)
            with autocast:
                if module.hparams.augment:
                    images = random_affine(images)
                logits = module(images)
                loss = F.cross_entropy(logits, labels)
            (logits.argmax(dim=1) == labels).float().mean()  # the module computes it for its log too
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            yield loss


def pretrain_steps(cfg: Config, train: TaskArrays) -> int:
    return cfg.pretrain.total_steps(len(train.labels), cfg.trainer.world_size)


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


def goal_met(ok: bool) -> str:
    """How a bench line reports a goal."""
    return "met" if ok else "NOT met"


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
