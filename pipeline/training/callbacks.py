"""What every fit runs beside the model: progress lines, the resume checkpoint, per-rank step times, and
who owns SIGTERM while Lightning trains."""
from __future__ import annotations

import contextlib
import logging
import signal
import statistics
import threading
import time
import warnings
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException


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


def step_time_report(per_rank_ms: list[float | None]) -> dict | None:
    """Per-rank median step times -> {per_rank_ms, median_ms, slowest_rank, slowest_ratio}; None if none timed.

    `slowest_ratio` is the slowest rank's median over the median of all ranks' medians.
    """
    timed = [(rank, ms) for rank, ms in enumerate(per_rank_ms) if ms is not None]
    if not timed:
        return None
    middle = statistics.median(ms for _, ms in timed)
    slowest, worst = max(timed, key=lambda item: item[1])
    return {
        "per_rank_ms": [None if ms is None else round(ms, 3) for ms in per_rank_ms],
        "median_ms": round(middle, 3),
        "slowest_rank": slowest,
        "slowest_ratio": round(worst / middle, 3) if middle > 0 else None,
    }


class StepTimes(Callback):
    """Each rank's median step time; at the end of fit rank 0 has all of them and names the slowest rank.

    A step time is the wall clock between two consecutive train batch ends on a rank. Intervals that
    span a validation or an epoch boundary are dropped, and so are the first WARMUP (compilation,
    allocator and loader warm-up; at most half of them in a very short run). Medians, so an
    occasional checkpoint save does not count. Under synchronous DDP the ranks meet at every gradient
    all-reduce, so a slow rank makes every rank's steps slower: the medians differ by what each rank
    does on its own between meetings (loading its batches, host work), and a slowest_ratio well above
    1 names a rank that is late to them.
    """

    WARMUP = 5

    def __init__(self, label: str):
        self.label = label
        self.times: list[float] = []
        self._last: float | None = None
        self.report: dict | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._last = None

    def on_validation_start(self, trainer, pl_module):
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    def median_ms(self) -> float | None:
        kept = self.times[min(self.WARMUP, len(self.times) // 2):]
        return statistics.median(kept) * 1e3 if kept else None

    def on_fit_end(self, trainer, pl_module):
        mine = self.median_ms()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            medians: list[float | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(medians, mine)  # every rank calls it: a collective
        else:
            medians = [mine]
        self.report = step_time_report(medians)
        if trainer.is_global_zero and self.report is not None:
            ranks = len(medians)
            print(f"[{self.label}] step time: median {self.report['median_ms']:.1f} ms over {ranks} "
                  f"rank{'s' if ranks != 1 else ''}; slowest rank {self.report['slowest_rank']} at "
                  f"{self.report['slowest_ratio'] or 1.0:.2f}x", flush=True)


def device_kind(trainer: L.Trainer) -> str:
    return "gpu" if isinstance(trainer.accelerator, (CUDAAccelerator, MPSAccelerator)) else "cpu"


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
    # The checkpoint folder is this run's own (keyed by config content, checkpoint_dir_for): on a first run it
    # already holds the run's curve folder (the logger creates it at setup, before ModelCheckpoint looks), on a
    # resume last.ckpt. Neither is worth a warning; ModelCheckpoint writes only best.ckpt there.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Lightning 2.6's own use of a torch class deprecated in torch 2.9: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
