"""Lightning overhead: the pretrain stage's training loop against the same loop written by hand.

Lightning measures itself this way (its tests/parity_pytorch): one model, data, seed,
optimizer and schedule, trained once through the Trainer and once through a plain PyTorch
loop, alternately, several times. Every run's per-step losses must agree to 5 decimals;
then the wall-time ratio is Lightning's overhead.

The Lightning side is `pipeline.training.fit` itself, the driver every stage uses, with
its checkpoint interval set past the last step and no validation set: what is timed is the
training loop, not checkpoint I/O or validation the hand-written loop would not do. The
hand-written side uses the same `training.stream`, `Classifier.configure_optimizers` and
step arithmetic (augment -> forward -> cross-entropy and accuracy -> backward -> step).
Augmentation and dropout stay on: both loops draw the same random numbers in the same order.
"""
from __future__ import annotations

import gc
import itertools
import tempfile
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from bench.common import Stopwatch, median, pretrain_classifier, pretrain_steps, quiet, raw_training_steps
from pipeline.config import Config
from pipeline.data.tasks import TaskArrays
from pipeline.training import FitPlan, fit, stream


class LossRecorder(Callback):
    def __init__(self, clock: Stopwatch):
        self.clock = clock
        self.losses: list[float] = []
        self.ended: list[float] = []  # when each step ended: the steady-state step time, without setup

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.ended.append(self.clock.now())


@dataclass
class Run:
    losses: list[float]
    seconds: float  # the whole call: setup + training
    step_ends: list[float]

    @property
    def steady_step_s(self) -> float:
        """Mean step time after the first step (which carries the loop's setup)."""
        ends = self.step_ends
        return (ends[-1] - ends[0]) / max(1, len(ends) - 1)


def lightning_loop(cfg: Config, train: TaskArrays, image_shape, total_steps: int) -> Run:
    """`pipeline.training.fit` on the pretrain module."""
    module = pretrain_classifier(cfg, image_shape, len(train.classes), total_steps)
    stage = cfg.pretrain.model_copy(update={"checkpoint_every_n_steps": total_steps + 1})
    clock = Stopwatch(cuda=cfg.trainer.accelerator != "cpu")
    recorder = LossRecorder(clock)
    with tempfile.TemporaryDirectory() as checkpoints, quiet():
        started = clock.now()
        fit(module, train, None, FitPlan(label="parity", stage=stage, trainer=cfg.trainer, seed=cfg.seed,
                                         checkpoint_dir=checkpoints, total_steps=total_steps, lr=module.hparams.lr,
                                         observers=(recorder,)))
        seconds = clock.now() - started
    return Run(recorder.losses, seconds, recorder.ended)


def torch_loop(cfg: Config, train: TaskArrays, image_shape, total_steps: int) -> Run:
    """A hand-written loop doing what fit() does, on CPU or one device."""
    if cfg.pretrain.accumulate_grad_batches != 1:
        raise ValueError("the parity loop supports accumulate_grad_batches=1 only")
    module = pretrain_classifier(cfg, image_shape, len(train.classes), total_steps)
    clock = Stopwatch(cuda=cfg.trainer.accelerator != "cpu")
    started = clock.now()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # what fit() does before training
    torch.use_deterministic_algorithms(cfg.trainer.deterministic)
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    module.to(device).train()
    batches = stream(train, cfg.pretrain.batch_size, cfg.trainer, cfg.seed, shuffle=True, cache_mb=cfg.data.cache_mb)
    losses: list[float] = []
    ends: list[float] = []
    for loss in itertools.islice(raw_training_steps(module, batches, device), total_steps):
        losses.append(loss.item())
        ends.append(clock.now())
    torch.use_deterministic_algorithms(False)
    return Run(losses, clock.now() - started, ends)


@dataclass
class ParityResult:
    steps: int
    lightning_s: list[float] = field(default_factory=list)
    torch_s: list[float] = field(default_factory=list)
    lightning_step_s: list[float] = field(default_factory=list)
    torch_step_s: list[float] = field(default_factory=list)
    max_loss_diff: float = 0.0
    final_loss: float = float("nan")

    @property
    def ratio(self) -> float:
        """Wall time of the whole call (setup included), median over repeats: the headline number."""
        return median(self.lightning_s) / median(self.torch_s)

    @property
    def step_ratio(self) -> float:
        """Steady-state step time: Lightning's per-step overhead without its one-off setup."""
        return median(self.lightning_step_s) / median(self.torch_step_s)

    def as_dict(self) -> dict:
        rounded = lambda xs, n=4: [round(x, n) for x in xs]  # noqa: E731
        return {"steps": self.steps, "lightning_s": rounded(self.lightning_s, 3), "torch_s": rounded(self.torch_s, 3),
                "lightning_step_s": rounded(self.lightning_step_s, 5), "torch_step_s": rounded(self.torch_step_s, 5),
                "wall_time_ratio": round(self.ratio, 4), "step_time_ratio": round(self.step_ratio, 4),
                "max_abs_loss_diff": self.max_loss_diff, "final_loss": round(self.final_loss, 6)}


def measure(cfg: Config, train: TaskArrays, image_shape, repeats: int = 3, warmup: bool = True) -> ParityResult:
    """Alternate Lightning and PyTorch runs `repeats` times; assert per-step losses agree to 5 decimals."""
    total_steps = pretrain_steps(cfg, train)
    result = ParityResult(steps=total_steps)
    if warmup:  # first-run costs (lazy imports, allocator growth) must not land on either side
        torch_loop(cfg, train, image_shape, min(total_steps, 5))
    reference = None
    for _ in range(repeats):
        for name, loop, times, step_times in (
            ("lightning", lightning_loop, result.lightning_s, result.lightning_step_s),
            ("torch", torch_loop, result.torch_s, result.torch_step_s),
        ):
            gc.collect()
            run = loop(cfg, train, image_shape, total_steps)
            times.append(run.seconds)
            step_times.append(run.steady_step_s)
            losses = run.losses
            if len(losses) != total_steps:
                raise AssertionError(f"{name} ran {len(losses)} steps, expected {total_steps}")
            if reference is None:
                reference = np.asarray(losses)
                continue
            np.testing.assert_almost_equal(losses, reference, decimal=5, err_msg=f"{name} losses diverge")
            result.max_loss_diff = max(result.max_loss_diff, float(np.abs(np.asarray(losses) - reference).max()))
    result.final_loss = float(reference[-1])
    return result
