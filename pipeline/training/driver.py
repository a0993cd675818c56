"""The fit driver: a module, its data and a FitPlan -> exactly `plan.total_steps` optimizer steps, resumable.

The step budget is fixed before training (epochs x optimizer steps per epoch at this world
size, _TrainStage.total_steps) and passed as `max_steps`, so a run resumed after SIGTERM finishes
with exactly the configured number of steps, as an uninterrupted run would. Rank 0 logs training
curves with DVCLive (curve_logging) and every rank times its steps (callbacks.StepTimes: the
slowest rank is named at the end).
"""
from __future__ import annotations

import io
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from pipeline import storage
from pipeline.config import Config, TrainerConfig, _TrainStage
from pipeline.data.shards import SplitShards
from pipeline.data.stream import InMemorySplit, ShardStream
from pipeline.data.tasks import TaskArrays
from pipeline.errors import Terminated
from pipeline.preflight import check_distributed
from pipeline.stop_together import StopTogether
from pipeline.training.callbacks import (
    ProgressLines, ResumeCheckpoint, StepTimes, device_kind, lightning_owns_sigterm, quiet_lightning,
)
from pipeline.training.curve_logging import (
    CURVES_STATE, CurveLogger, TrainCurves, curve_interval, curves_workdir, read_curve_state,
)

RESUME_NAME = "last"
BEST_NAME = "best"

TrainData = SplitShards | InMemorySplit | TaskArrays


@dataclass(frozen=True)
class FitPlan:
    """Everything about a fit but the module and its data, decided once per stage (plan_fit)."""

    label: str  # the progress lines' and curves' name: "pretrain", "finetune:scratch"
    stage: _TrainStage
    trainer: TrainerConfig
    seed: int
    checkpoint_dir: str  # resumable state, keyed by config content (checkpoint_dir_for)
    total_steps: int
    lr: float  # the peak learning rate at this world size (the module is built with it)
    cache_mb: int = 1024
    monitor_best: bool = False  # keep best.ckpt by val/acc
    partly_frozen: bool = False  # a backbone frozen for the first epochs: DDP must expect unused parameters
    curves_dir: str | Path | None = None  # default: curves_workdir(checkpoint_dir)
    observers: tuple[Callback, ...] = field(default=())  # callbacks that watch without changing (benchmarks)


def plan_fit(cfg: Config, stage: _TrainStage, train_samples: int, label: str, checkpoint_dir: str,
             **options) -> FitPlan:
    """The one place a stage's fit is planned: step budget and learning rate at this world size."""
    world = cfg.trainer.world_size
    return FitPlan(label=label, stage=stage, trainer=cfg.trainer, seed=cfg.seed, checkpoint_dir=checkpoint_dir,
                   total_steps=stage.total_steps(train_samples, world), lr=stage.lr(world),
                   cache_mb=cfg.data.cache_mb, **options)


@dataclass
class FitResult:
    module: L.LightningModule
    best_path: str | None
    steps: int
    resumed_from_step: int
    wall_time_s: float
    val_accuracy: float | None
    best_score: float | None
    is_global_zero: bool
    world_size: int = 1
    device_kind: str = "cpu"  # "gpu" or "cpu"
    device_hours: float = 0.0  # wall_time_s x world_size / 3600: what the run cost in devices (or CPU processes)
    step_time: dict | None = None  # StepTimes' report: per_rank_ms, median_ms, slowest_rank, slowest_ratio
    images_per_s: float | None = None  # rank 0: median training throughput of all ranks (TrainCurves.rates)
    curves_dir: Path | None = None  # rank 0: this run's DVCLive folder, for the stage to publish (publish_curves)

    def usage(self) -> dict:
        """What a stage's run report (pipeline/runinfo.py) records about the run's cost and speed."""
        return {"device_hours": self.device_hours, "device_kind": self.device_kind, "step_time": self.step_time,
                "images_per_s": self.images_per_s}


def compile_in_place(module: nn.Module) -> None:
    """torch.compile the module's repeated blocks, or else its whole forward, in place.

    In place, because handing Lightning a torch.compile() wrapper makes it compile training_step
    too (Dynamo cannot trace self.log), and because the state_dict keys stay as they are (no
    `_orig_mod.` prefix), so checkpoints load either way. A transformer's layers are compiled
    one by one ("regional compilation"): identical layers share one compiled graph, so a
    24-layer model compiles about as fast as a 1-layer one, and runs as fast as a whole-model compile.
    """
    regions = getattr(module, "compile_regions", lambda: [])()
    for region in regions or [module]:
        region.compile()


def stream(data: TrainData, batch_size: int, trainer_cfg: TrainerConfig, seed: int, shuffle: bool,
           cache_mb: int) -> ShardStream:
    """The loader of one split for this rank (pipeline/data/stream.py)."""
    if isinstance(data, TaskArrays):
        data = InMemorySplit(data.images, data.labels)
    device = None
    on_gpu = trainer_cfg.accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    if trainer_cfg.data_on_device and on_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # held data gathered on the GPU
    # On a GPU batches travel as uint8 and become floats there (Classifier.on_after_batch_transfer).
    return ShardStream(data, batch_size, seed=seed, shuffle=shuffle, readahead=trainer_cfg.num_workers,
                       cache_bytes=cache_mb << 20, device=device, uint8=on_gpu)


def fit(module: L.LightningModule, train: TrainData, val: TrainData | None, plan: FitPlan) -> FitResult:
    """Train `module` for exactly `plan.total_steps` optimizer steps, resuming from `plan.checkpoint_dir` if it can.

    Rank 0 logs the training curves with DVCLive into `plan.curves_dir`; the stage publishes them (publish_curves).
    """
    quiet_lightning()
    check_distributed(plan.trainer)
    L.seed_everything(plan.seed, workers=True, verbose=False)
    started = time.perf_counter()
    resume = storage.join(plan.checkpoint_dir, f"{RESUME_NAME}.ckpt")
    ckpt_path, resumed_from, curve_files = _resume_point(plan.checkpoint_dir, resume)
    curves = CurveLogger(plan.curves_dir if plan.curves_dir is not None else curves_workdir(plan.checkpoint_dir),
                         plan.label, curve_files, state_uri=storage.join(plan.checkpoint_dir, CURVES_STATE))
    step_times = StepTimes(plan.label)
    train_curves = TrainCurves(curves, plan.total_steps, curve_interval(plan.total_steps, plan.trainer.log_every_n_steps))
    best = ModelCheckpoint(dirpath=plan.checkpoint_dir, filename=BEST_NAME, monitor="val/acc", mode="max",
                           save_top_k=1, enable_version_counter=False) if plan.monitor_best and val is not None else None
    callbacks: list[Callback] = [
        train_curves,  # before ResumeCheckpoint: a checkpoint
        ResumeCheckpoint(resume, plan.stage.checkpoint_every_n_steps),  # at step N then carries the curves' point N
        StopTogether(),  # a SIGTERM on any rank stops all ranks at one step, where ResumeCheckpoint saves
        ProgressLines(plan.label, plan.total_steps, plan.trainer.log_every_n_steps, resumed_from),
        step_times, *([best] if best is not None else []), *plan.observers,
    ]
    trainer = _trainer(plan, callbacks, curves, checkpointing=best is not None)
    if ckpt_path and trainer.is_global_zero:
        print(f"[{plan.label}] resuming from {ckpt_path} at step {resumed_from}", flush=True)
    if plan.trainer.compile:
        compile_in_place(module)
    train_loader, val_loader = _loaders(train, val, plan, resumed_from)
    try:
        with lightning_owns_sigterm():
            trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    except SIGTERMException:
        raise Terminated() from None
    if trainer.is_global_zero:
        curves.settle()
    return _result(module, trainer, plan, best, resumed_from, time.perf_counter() - started, step_times,
                   train_curves, curves)


def _loaders(train: TrainData, val: TrainData | None, plan: FitPlan, resumed_from: int):
    """The train stream (continuing where the checkpoint was: the batches an uninterrupted run would see) and the
    val stream, at twice the batch (no gradients to hold)."""
    train_loader = stream(train, plan.stage.batch_size, plan.trainer, plan.seed, shuffle=True, cache_mb=plan.cache_mb)
    val_loader = stream(val, plan.stage.batch_size * 2, plan.trainer, plan.seed, shuffle=False,
                        cache_mb=plan.cache_mb) if val is not None else None
    if resumed_from:
        train_loader.resume_after(resumed_from, plan.stage.accumulate_grad_batches)
    return train_loader, val_loader


def _result(module: L.LightningModule, trainer: L.Trainer, plan: FitPlan, best: ModelCheckpoint | None,
            resumed_from: int, wall_s: float, step_times: StepTimes, train_curves: TrainCurves,
            curves: CurveLogger) -> FitResult:
    val_acc = trainer.callback_metrics.get("val/acc")
    wall_time_s = round(wall_s, 3)
    return FitResult(
        module=module, best_path=_best_path(best, plan.checkpoint_dir), steps=trainer.global_step,
        resumed_from_step=resumed_from, wall_time_s=wall_time_s,
        val_accuracy=float(val_acc) if val_acc is not None else None,
        best_score=float(best.best_model_score) if best is not None and best.best_model_score is not None else None,
        is_global_zero=trainer.is_global_zero, world_size=trainer.world_size, device_kind=device_kind(trainer),
        device_hours=round(wall_time_s * trainer.world_size / 3600, 6), step_time=step_times.report,
        images_per_s=round(statistics.median(train_curves.rates), 1) if train_curves.rates else None,
        curves_dir=curves.directory if trainer.is_global_zero and not curves.failed
        and curves.directory.is_dir() else None,
    )


def _resume_point(checkpoint_dir: str, resume: str) -> tuple[str | None, int, dict[str, str] | None]:
    """(checkpoint to resume from, its global step, the curve files as of that step); (None, 0, None) on a fresh run."""
    if not storage.exists(resume):
        return None, 0, None
    # Read before fit: Lightning restores global_step only after on_fit_start, too late to report.
    step = int(torch.load(io.BytesIO(storage.read_bytes(resume)), map_location="cpu", weights_only=False)["global_step"])
    return resume, step, read_curve_state(storage.join(checkpoint_dir, CURVES_STATE), step)


def _trainer(plan: FitPlan, callbacks: list[Callback], curves: CurveLogger, checkpointing: bool) -> L.Trainer:
    strategy = plan.trainer.strategy
    if strategy == "ddp":
        # Fail in minutes, not the 30-minute default, when a peer never shows up or is lost
        # (PIPELINE_DDP_TIMEOUT_S shortens it; on Kubernetes the Job's FailJob stops survivors sooner).
        # A backbone frozen for the first epochs gets no gradients then: DDP must be told to expect that.
        timeout_s = float(os.environ.get("PIPELINE_DDP_TIMEOUT_S") or 300)
        strategy = DDPStrategy(timeout=timedelta(seconds=timeout_s), find_unused_parameters=plan.partly_frozen)
    return L.Trainer(
        accelerator=plan.trainer.accelerator,
        devices=plan.trainer.devices,
        num_nodes=plan.trainer.num_nodes,
        strategy=strategy,
        precision=plan.trainer.precision,
        deterministic=plan.trainer.deterministic,
        max_steps=plan.total_steps,
        max_epochs=-1,
        accumulate_grad_batches=plan.stage.accumulate_grad_batches,
        callbacks=callbacks,
        logger=curves,  # DVCLive; rank 0 writes (TrainCurves per step, the module's self.log per epoch)
        enable_checkpointing=checkpointing,  # else Lightning adds a ModelCheckpoint of its own
        enable_progress_bar=False,  # ProgressLines reads well in terminals and in Prefect/pod logs
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=plan.trainer.log_every_n_steps,
        default_root_dir=plan.checkpoint_dir,
        use_distributed_sampler=False,  # ShardStream gives each rank its share itself
    )


def publish_curves(result: FitResult, target: Path) -> bool:
    """Copy rank 0's DVCLive folder into the stage's staged output (e.g. out / CURVES_DIR); False if it has none."""
    if result.curves_dir is None or not result.curves_dir.is_dir():
        return False
    shutil.copytree(result.curves_dir, target, dirs_exist_ok=True)
    return True


def _best_path(best: ModelCheckpoint | None, checkpoint_dir: str) -> str | None:
    if best is None:
        return None
    if best.best_model_path:
        return best.best_model_path
    # Resumed at the very end: no validation ran in this process, but the earlier best is on disk.
    fallback = storage.join(checkpoint_dir, f"{BEST_NAME}.ckpt")
    return fallback if storage.exists(fallback) else None


def checkpoint_dir_for(root_uri: str, name: str, fingerprint: str) -> str:
    """Resumable state is keyed by config content: a changed config never resumes stale state."""
    return storage.join(root_uri, f"{name}-{fingerprint}")
