"""Shared training driver: config -> Lightning Trainer -> fit, resumable and preemption-safe.

The step budget is fixed before training (epochs x optimizer steps per epoch at this world
size) and passed as `max_steps`, so a run resumed after SIGTERM finishes with exactly the
configured number of steps, as an uninterrupted run would.

    single CPU:   python -m pipeline pretrain
    one GPU:      python -m pipeline pretrain --set trainer.accelerator=gpu --set trainer.precision=bf16-mixed
    many nodes:   MASTER_ADDR=... MASTER_PORT=... NODE_RANK=r python -m pipeline pretrain \
                    --set trainer.accelerator=gpu --set trainer.devices=8 --set trainer.num_nodes=2 \
                    --set trainer.strategy=ddp
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import io
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from pipeline import storage
from pipeline.config import TrainerConfig, _TrainStage
from pipeline.data.shards import SplitShards
from pipeline.data.stream import InMemorySplit, ShardStream
from pipeline.data.tasks import TaskArrays
from pipeline.errors import EXIT_SIGTERM
from pipeline.preflight import check_distributed

RESUME_NAME = "last"
BEST_NAME = "best"


class Terminated(BaseException):
    """SIGTERM received; training state was checkpointed. Maps to exit 143."""

    exit_code = EXIT_SIGTERM


def world_size(trainer_cfg: TrainerConfig) -> int:
    return trainer_cfg.num_nodes * trainer_cfg.devices


def steps_per_epoch(num_samples: int, stage: _TrainStage, world: int) -> int:
    """Optimizer steps per epoch, as Lightning counts them with a DistributedSampler."""
    per_rank = math.ceil(num_samples / world)
    batches = math.ceil(per_rank / stage.batch_size)
    return math.ceil(batches / stage.accumulate_grad_batches)


class ProgressLines(Callback):
    """One readable line per `log_every_n_steps` and per validation: works in logs, not only TTYs."""

    def __init__(self, label: str, total_steps: int, every: int, start_step: int = 0):
        self.label, self.total_steps, self.every, self.start_step = label, total_steps, every, start_step
        self.started = time.perf_counter()

    def on_fit_start(self, trainer, pl_module):
        # Every rank reports: logs of a multi-node job then prove the world size from all pods.
        print(f"[{self.label}] world_size={trainer.world_size} global_rank={trainer.global_rank} "
              f"node_rank={trainer.node_rank} start_step={self.start_step} total_steps={self.total_steps}",
              flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if trainer.is_global_zero and (step % self.every == 0 or step == self.total_steps) and step:
            loss = getattr(getattr(pl_module, "train_means", None), "last_loss", None)
            lr = trainer.optimizers[0].param_groups[-1]["lr"]
            rate = step / max(time.perf_counter() - self.started, 1e-9)
            print(f"[{self.label}] step {step}/{self.total_steps} epoch {trainer.current_epoch} "
                  f"loss {float('nan') if loss is None else float(loss):.4f} lr {lr:.2e} ({rate:.1f} steps/s)", flush=True)

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero and not trainer.sanity_checking and "val/acc" in trainer.callback_metrics:
            print(f"[{self.label}] epoch {trainer.current_epoch} val/acc {float(trainer.callback_metrics['val/acc']):.4f}",
                  flush=True)


class ResumeCheckpoint(Callback):
    """Keeps `last.ckpt` current: every `every_n_steps` optimizer steps, and at a SIGTERM.

    Lightning turns SIGTERM into SIGTERMException at a step boundary; the state saved there
    resumes exactly. Not ModelCheckpoint: its hooks cost ~0.3 ms of host time every step
    (a state key is rebuilt per hook call), which a small model's step notices.
    """

    def __init__(self, path: str, every_n_steps: int):
        self.path, self.every = path, every_n_steps
        self.saved_at = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        # With gradient accumulation several batches end on one step: save once per step.
        if step and step % self.every == 0 and step != self.saved_at:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: the run resumes from it
            self.saved_at = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # Dropout and augmentation draw from the global generators: with their state (and the loader's
        # position, pipeline/data/stream.py) a resumed run takes the steps an uninterrupted one takes.
        # Torch's generators only: the models draw from nothing else, and tensors load with weights_only.
        checkpoint["torch_rng"] = {"cpu": torch.get_rng_state(),
                                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if "torch_rng" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng"]["cpu"])
            if checkpoint["torch_rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(checkpoint["torch_rng"]["cuda"])

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: the run resumes from it
            if trainer.is_global_zero:
                print(f"[checkpoint] SIGTERM at step {trainer.global_step}: saved {self.path}", flush=True)


@contextlib.contextmanager
def lightning_owns_sigterm() -> Iterator[None]:
    # Outside fit, our CLI handler turns SIGTERM into exit 143 at once. Inside fit, Lightning's
    # handler must be the only one, so it can stop at a step boundary and checkpoint.
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (None, signal.SIG_DFL) and threading_main():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        if threading_main():
            signal.signal(signal.SIGTERM, previous)


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.utilities.model_summary"):
        logging.getLogger(name).setLevel(logging.WARNING)


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


TrainData = SplitShards | InMemorySplit | TaskArrays


def stream(data: TrainData, batch_size: int, trainer_cfg: TrainerConfig, seed: int, shuffle: bool,
           cache_mb: int) -> ShardStream:
    """The loader of one split for this rank (pipeline/data/stream.py)."""
    if isinstance(data, TaskArrays):
        data = InMemorySplit(data.images, data.labels)
    device = None
    if trainer_cfg.data_on_device and trainer_cfg.accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # held data gathered on the GPU
    return ShardStream(data, batch_size, seed=seed, shuffle=shuffle, readahead=trainer_cfg.num_workers,
                       cache_bytes=cache_mb << 20, device=device)


def fit(
    module: L.LightningModule,
    train: TrainData,
    val: TrainData | None,
    stage: _TrainStage,
    trainer_cfg: TrainerConfig,
    checkpoint_dir: str,
    total_steps: int,
    label: str,
    seed: int,
    monitor_best: bool = False,
    extra_callbacks: list[Callback] | None = None,
    partly_frozen: bool = False,
    cache_mb: int = 1024,
) -> FitResult:
    """Train `module` for exactly `total_steps` optimizer steps, resuming from `checkpoint_dir` if possible.

    `extra_callbacks` observe the run without changing it (the benchmarks record losses and
    test accuracy through them).
    """
    quiet_lightning()
    check_distributed(trainer_cfg)
    L.seed_everything(seed, workers=True, verbose=False)
    started = time.perf_counter()
    resume = storage.join(checkpoint_dir, f"{RESUME_NAME}.ckpt")
    ckpt_path = resume if storage.exists(resume) else None
    resumed_from = 0
    if ckpt_path:
        # Read before fit: Lightning restores global_step only after on_fit_start, too late to report.
        resumed_from = int(torch.load(io.BytesIO(storage.read_bytes(ckpt_path)), map_location="cpu",
                                      weights_only=False)["global_step"])
    callbacks: list[Callback] = [
        ResumeCheckpoint(resume, stage.checkpoint_every_n_steps),
        ProgressLines(label, total_steps, trainer_cfg.log_every_n_steps, resumed_from),
    ]
    best = None
    if monitor_best and val is not None:
        best = ModelCheckpoint(dirpath=checkpoint_dir, filename=BEST_NAME, monitor="val/acc", mode="max",
                               save_top_k=1, enable_version_counter=False)
        callbacks.append(best)
    callbacks.extend(extra_callbacks or [])
    strategy = trainer_cfg.strategy
    if strategy == "ddp":
        # Fail in minutes, not the 30-minute default, when a peer never shows up or is lost
        # (PIPELINE_DDP_TIMEOUT_S shortens it; on Kubernetes the Job's FailJob stops survivors sooner).
        # A backbone frozen for the first epochs gets no gradients then: DDP must be told to expect that.
        timeout_s = float(os.environ.get("PIPELINE_DDP_TIMEOUT_S") or 300)
        strategy = DDPStrategy(timeout=timedelta(seconds=timeout_s), find_unused_parameters=partly_frozen)
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=strategy,
        precision=trainer_cfg.precision,
        deterministic=trainer_cfg.deterministic,
        max_steps=total_steps,
        max_epochs=-1,
        accumulate_grad_batches=stage.accumulate_grad_batches,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=best is not None,  # else Lightning adds a ModelCheckpoint of its own
        enable_progress_bar=False,  # ProgressLines reads well in terminals and in Prefect/pod logs
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        default_root_dir=checkpoint_dir,
        use_distributed_sampler=False,  # ShardStream gives each rank its share itself
    )
    if ckpt_path:
        if trainer.is_global_zero:
            print(f"[{label}] resuming from {ckpt_path} at step {resumed_from}", flush=True)
    if trainer_cfg.compile:
        compile_in_place(module)
    train_loader = stream(train, stage.batch_size, trainer_cfg, seed, shuffle=True, cache_mb=cache_mb)
    val_loader = stream(val, stage.batch_size * 2, trainer_cfg, seed, shuffle=False, cache_mb=cache_mb) \
        if val is not None else None
    if resumed_from:
        # The loader continues where the checkpoint was, so the resumed run sees the batches an
        # uninterrupted one would.
        train_loader.resume_after(resumed_from, stage.accumulate_grad_batches)
    try:
        with lightning_owns_sigterm():
            trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    except SIGTERMException:
        raise Terminated() from None
    val_acc = trainer.callback_metrics.get("val/acc")
    return FitResult(
        module=module,
        best_path=_best_path(best, checkpoint_dir),
        steps=trainer.global_step,
        resumed_from_step=resumed_from,
        wall_time_s=round(time.perf_counter() - started, 3),
        val_accuracy=float(val_acc) if val_acc is not None else None,
        best_score=float(best.best_model_score) if best is not None and best.best_model_score is not None else None,
        is_global_zero=trainer.is_global_zero,
    )


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

