"""Transfer speed: steps and seconds until the fine-tuned and the scratch model reach one test accuracy.

The target is the scratch model's *final* test accuracy. Both models are trained by the
finetune stage itself (`pipeline.stages.finetune.run`, same label budget, schedule and
seed); a probe callback measures test accuracy every `every` steps. Seconds count training
only: the probe's own evaluation time is subtracted. Goal: the fine-tuned model reaches the
target in at most 1/3 of the scratch model's steps.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from unittest import mock

import torch
from lightning.pytorch.callbacks import Callback

from bench.common import Stopwatch, quiet
from pipeline import training
from pipeline.config import Config
from pipeline.data.prepared import load_prepared
from pipeline.data.tasks import TaskArrays, to_tensor
from pipeline.stages import finetune


class TestAccuracyProbe(Callback):
    """Test accuracy every `every` optimizer steps; leaves the run's training state untouched."""

    def __init__(self, test: TaskArrays, every: int, clock: Stopwatch | None = None):
        self.test, self.every = test, every
        self.clock = clock or Stopwatch()
        self.curve: list[tuple[int, float, float]] = []  # (step, train seconds so far, accuracy)
        self._started = self._probing = 0.0

    def on_train_start(self, trainer, pl_module):
        self._started, self._probing = self.clock.now(), 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        began = self.clock.now()
        self.curve.append((step, began - self._started - self._probing, self.accuracy(pl_module)))
        self._probing += self.clock.now() - began

    @torch.no_grad()
    def accuracy(self, module: torch.nn.Module, batch_size: int = 1024) -> float:
        modes = {m: m.training for m in module.modules()}  # the backbone may be frozen (eval) on purpose
        module.eval()
        try:
            correct = sum(int((module(self.test.images[i:i + batch_size].to(module.device)).argmax(1).cpu()
                               == self.test.labels[i:i + batch_size]).sum())
                          for i in range(0, len(self.test.labels), batch_size))
        finally:
            for m, training_mode in modes.items():
                m.training = training_mode
        return correct / len(self.test.labels)

    def first_reaching(self, target: float) -> tuple[int, float] | None:
        """(step, train seconds) of the first probe at or above `target` accuracy."""
        return next(((step, seconds) for step, seconds, acc in self.curve if acc >= target - 1e-9), None)


@dataclass
class TransferResult:
    target_accuracy: float
    total_steps: int
    scratch: tuple[int, float]
    finetuned: tuple[int, float] | None
    curves: dict = field(default_factory=dict)

    @property
    def step_ratio(self) -> float | None:
        return None if self.finetuned is None else self.finetuned[0] / self.scratch[0]

    @property
    def time_ratio(self) -> float | None:
        return None if self.finetuned is None else self.finetuned[1] / max(self.scratch[1], 1e-9)

    def as_dict(self) -> dict:
        pair = lambda p: None if p is None else {"steps": p[0], "seconds": round(p[1], 3)}  # noqa: E731
        return {"target_test_accuracy": round(self.target_accuracy, 4), "total_steps": self.total_steps,
                "scratch": pair(self.scratch), "finetuned": pair(self.finetuned),
                "step_ratio": None if self.step_ratio is None else round(self.step_ratio, 4),
                "time_ratio": None if self.time_ratio is None else round(self.time_ratio, 4),
                "curves": {k: [(s, round(t, 3), round(a, 4)) for s, t, a in v] for k, v in self.curves.items()}}


def measure(cfg: Config, every: int = 1) -> TransferResult:
    """Run the finetune stage (prepare and pretrain outputs must exist under cfg.paths) with probes attached."""
    data = load_prepared(cfg.paths.uri("prepared"))
    held = data.subset("test")
    test = TaskArrays(to_tensor(held.images), torch.from_numpy(held.labels), data.class_names)
    probes: dict[str, TestAccuracyProbe] = {}

    def probed_fit(module, train, val, plan: training.FitPlan):
        probes[plan.label.split(":")[-1]] = probe = TestAccuracyProbe(test, every)
        return training.fit(module, train, val, dataclasses.replace(plan, observers=(*plan.observers, probe)))

    # Patch the stage's own reference to fit: the benchmark trains exactly what `finetune` trains.
    with mock.patch.object(finetune, "fit", functools.wraps(training.fit)(probed_fit)), quiet():
        finetune.run(cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"train_scratch_baseline": True})}))
    scratch, tuned = probes["scratch"], probes["finetuned"]
    target = scratch.curve[-1][2]
    return TransferResult(target_accuracy=target, total_steps=scratch.curve[-1][0],
                          scratch=scratch.first_reaching(target), finetuned=tuned.first_reaching(target),
                          curves={"scratch": scratch.curve, "finetuned": tuned.curve})
