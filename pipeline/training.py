"""Shared training driver: config -> Lightning Trainer -> fit, resumable and preemption-safe.

The step budget is fixed before training (epochs x optimizer steps per epoch at this world
size) and passed as `max_steps`, so a run resumed after SIGTERM finishes with exactly the
configured number of steps, as an uninterrupted run would. Rank 0 logs training curves with
DVCLive (CurveLogger, TrainCurves: the stage publishes them in its output, pipeline/curves.py reads
them) and every rank times its steps (StepTimes: the slowest rank is named at the end).

    single CPU:   python -m pipeline pretrain
    one GPU:      python -m pipeline pretrain --set trainer.accelerator=gpu --set trainer.precision=bf16-mixed
    many nodes:   MASTER_ADDR=... MASTER_PORT=... NODE_RANK=r python -m pipeline pretrain \
                    --set trainer.accelerator=gpu --set trainer.devices=8 --set trainer.num_nodes=2 \
                    --set trainer.strategy=ddp
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import io
import shutil
import signal
import statistics
import tempfile
import threading
import time
import warnings
from argparse import Namespace
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from dvclive import Live
from dvclive.fabric import DVCLiveLogger as _FabricDVCLiveLogger
from dvclive.lightning import DVCLiveLogger
from lightning.fabric.loggers.logger import _DummyExperiment, rank_zero_experiment
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from pipeline import storage
from pipeline.config import TrainerConfig, _TrainStage
from pipeline.data.shards import SplitShards
from pipeline.data.stream import InMemorySplit, ShardStream
from pipeline.data.tasks import TaskArrays
from pipeline.errors import EXIT_SIGTERM
from pipeline.stop_together import StopTogether
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


# ---------------------------------------------------------------- training curves (DVCLive)

CURVES_DIR = "curves"  # each run's DVCLive folder, published as <stage output>/curves[/<variant>] (pipeline/curves.py)
CURVES_STATE = "curves.json"  # beside last.ckpt: the curve files as of the last checkpoint or epoch end (resume)


def curves_workdir(checkpoint_dir: str) -> Path:
    """Where a run's DVCLive folder grows during fit (rank 0): beside its checkpoints, or a local mirror of remote ones.

    Not the stage's output folder: that is published whole at the end (storage.staged_output), and
    `dvc repro` deletes it before re-running a stage. The stage copies this folder into its output.
    """
    if storage.is_remote(checkpoint_dir):
        return Path(tempfile.gettempdir()) / "pipeline-curves" / checkpoint_dir.rstrip("/").rsplit("/", 1)[-1]
    return Path(checkpoint_dir) / CURVES_DIR


class FilesOnlyLive(Live):
    """DVCLive writing its files (plots/metrics/**.tsv, metrics.json, params.yaml) and nothing else.

    A plain `Live()` opens the DVC repository around the working directory (and runs `dvc init` in a
    git repository that has none), `git add`s its folder under `dvc exp run`, can save a DVC
    experiment, writes VS Code signal files into .dvc/tmp and posts to DVC Studio when a token is
    configured. Here the curves are part of a stage's DVC output and dvc.yaml's `plots:` draws them,
    so none of that is wanted, least of all from inside `dvc repro`, a Prefect task or a pod.
    (These are dvclive 3.x's own hooks; tests/integration/test_curves.py checks that none of it happens.)
    """

    def _init_dvc(self) -> None:
        self._dvc_file = "dvc.yaml"  # never written: CurveLogger passes dvcyaml=False

    def _init_studio(self) -> None:
        self._studio_events_to_skip = {"start", "data", "done"}

    def post_data_to_studio(self) -> None:
        pass

    def end(self) -> None:
        if "step" in self.summary:
            self.step = self.summary["step"]
        self.sync()


class CurveLogger(DVCLiveLogger):
    """DVCLive's Lightning logger, writing files only (FilesOnlyLive), that can never stop training.

    Rank 0 alone writes; the other ranks get Lightning's dummy experiment. A folder it cannot write
    costs one warning line and this run's curves, never the run.

    Resume: `save_state()` copies the curve files to `state_uri` (CURVES_STATE beside the checkpoints,
    local or remote) at every checkpoint and epoch end. A resumed run passes `restore`: those files
    cut back to the checkpoint's step (read_curve_state), so the curves continue exactly there, rows
    the interrupted run logged after its checkpoint are dropped (the resumed run logs those steps
    again) and no step appears twice. Without `restore` the folder starts afresh.
    """

    def __init__(self, directory: str | Path, label: str, restore: dict[str, str] | None = None,
                 state_uri: str | None = None):
        super().__init__(dir=str(directory), resume=restore is not None, save_dvc_exp=False, dvcyaml=False,
                         report=None, monitor_system=False)
        self.directory, self.label, self.restore, self.state_uri = Path(directory), label, restore, state_uri
        self.failed = False

    @property
    @rank_zero_experiment
    def experiment(self) -> Live | _DummyExperiment:
        if self._experiment is None:
            if self.failed:
                return _DummyExperiment()
            try:  # Lightning itself asks for it (hasattr at setup): it must not raise either
                if self.restore is not None:
                    _write_curve_files(self.directory, self.restore)
                self._experiment = FilesOnlyLive(**self._kwargs)
            except Exception as exc:  # noqa: BLE001 - see _fail
                self._fail(exc)
                return _DummyExperiment()
        return self._experiment

    def _fail(self, exc: Exception) -> None:
        """Curves are worth one warning line, never a failed training run: log nothing more, train on."""
        self.failed = True
        print(f"[{self.label}] warning: no training curves for this run: cannot write {self.directory} "
              f"({type(exc).__name__}: {exc}); training continues", flush=True)

    def _guarded(self, action, *args) -> None:
        if self.failed:
            return
        try:
            action(*args)
        except Exception as exc:  # noqa: BLE001 - see _fail
            self._fail(exc)

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None, sync: bool | None = True) -> None:
        if "epoch" in metrics and step is not None:
            # Lightning's own calls (the module's per-epoch self.log) carry "epoch" and number the step by the
            # batches stepped *before* the current one: 4-step epochs end at its step 3, 7, ... The curves count
            # optimizer steps done, as TrainCurves and the progress lines do: 4, 8, ...
            step += 1
        # Lightning's "epoch" would be two rows per epoch at one step, and no curve anyone plots.
        metrics = {name: value for name, value in metrics.items() if name != "epoch"}
        if metrics:
            # The Fabric logger's method: the Lightning one walks inspect.stack() on every call to decide on
            # syncing; here every call syncs (metrics.json holds the step a resume continues from).
            self._guarded(_FabricDVCLiveLogger.log_metrics, self, metrics, step, True)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        # Plain JSON types: DVCLive's YAML writer refuses tuples (image_shape) and other objects.
        plain = json.loads(json.dumps(vars(params) if isinstance(params, Namespace) else dict(params), default=str))
        self._guarded(lambda: self.experiment.log_params(plain))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self._guarded(self._experiment.end)

    def settle(self) -> None:
        """Rank 0 after fit: the folder holds this run's curves even if nothing was logged (resumed at the end)."""
        self._guarded(lambda: self.experiment)

    def files(self) -> dict[str, str] | None:
        """This run's curve files as they are now (rank 0); None if there are none."""
        if self.failed:
            return None
        if self._experiment is None:
            return self.restore  # nothing logged since the resume: what the resume started from
        return {path.relative_to(self.directory).as_posix(): path.read_text(encoding="utf-8")
                for path in sorted(self.directory.rglob("*")) if path.is_file()}

    def save_state(self) -> None:
        """Rank 0: the curve files to `state_uri`, for a resumed run to continue from (read_curve_state)."""
        if self.state_uri is None or self.failed:
            return

        def save() -> None:
            files = self.files()
            if files is not None:
                storage.write_bytes(self.state_uri, json.dumps({"files": files}).encode())

        self._guarded(save)


def read_curve_state(state_uri: str, step: int) -> dict[str, str] | None:
    """The curve files saved at `state_uri` with every row after `step` dropped; None if there is no usable state.

    The state may be newer than the checkpoint being resumed (saved at a later epoch end): the rows
    past the checkpoint's step go, since the resumed run logs those steps again. Rows *at* the step
    stay, among them an epoch's validation logged after that step's checkpoint, which Lightning does
    not repeat on resume.
    """
    try:
        files = json.loads(storage.read_bytes(state_uri))["files"]
    except Exception:  # noqa: BLE001 - missing (a run from before curves) or unreadable: the curves start afresh
        return None
    return {name: _rows_up_to(text, step) if name.endswith(".tsv") else text for name, text in files.items()}


def _rows_up_to(tsv: str, step: int) -> str:
    lines = tsv.splitlines(keepends=True)
    if not lines:
        return tsv
    column = lines[0].rstrip("\r\n").split("\t").index("step")
    kept = [line for line in lines[1:] if line.strip() and int(line.split("\t")[column]) <= step]
    return "".join([lines[0], *kept])


def _write_curve_files(directory: Path, files: dict[str, str]) -> None:
    """Lay out a checkpoint's curve files as DVCLive's folder, replacing whatever the folder held."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            continue  # only ever names relative to the folder (CurveLogger.files)
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


CURVE_POINTS = 100  # a run with fewer points than this at trainer.log_every_n_steps logs its curves more often


def curve_interval(total_steps: int, every: int) -> int:
    """Optimizer steps between two points of the training curves: trainer.log_every_n_steps, or less (down to
    every step) when the run is too short to give CURVE_POINTS points at that interval."""
    return max(1, min(every, total_steps // CURVE_POINTS))


class TrainCurves(Callback):
    """Per-step points of the training curves, every `every` optimizer steps (and at the last step), rank 0.

    `train/step/loss` and `train/step/acc` are means over rank 0's batches since the previous point, read
    from the module's device-side epoch sums (classifier.RunningMeans): one host sync per point, nothing
    per step. `train/step/lr` is the head's learning rate. Throughput (all ranks' images, rank 0's times the
    world size, over the wall time since the previous point, validation excluded) is kept in `rates`, not
    in the curves: they are part of a stage's DVC output, which must not hold timings (FitResult.images_per_s).
    Per-epoch `train/{loss,acc}` and `val/{loss,acc}` come from the module's self.log, through Lightning,
    to the same logger. (Not `step/...`: DVCLive keeps the step number under "step" in metrics.json.)
    Saves the curve state at every checkpoint and epoch end, so a resumed run continues them (CurveLogger).
    """

    def __init__(self, curves: CurveLogger, total_steps: int, every: int):
        self.curves, self.total_steps, self.every = curves, total_steps, max(1, every)
        self._logged = -1
        self._mark = time.perf_counter()
        self._validating_s, self._validation_started = 0.0, None
        self._means, self._sums, self._count = None, [0.0, 0.0], 0
        self.rates: list[float] = []  # images/s of each window (all ranks), validation excluded

    def on_train_start(self, trainer, pl_module):
        self._logged, self._mark, self._validating_s, self._means = trainer.global_step, time.perf_counter(), 0.0, None

    def on_validation_start(self, trainer, pl_module):
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self._validation_started is not None:
            self._validating_s += time.perf_counter() - self._validation_started
            self._validation_started = None

    def _window(self, means) -> tuple[list[float], int]:
        """(loss and accuracy sums, samples) since the previous point: RunningMeans restarts every epoch."""
        sums, count = means.sums.tolist(), means.count
        if means is self._means:
            window = [now - before for now, before in zip(sums, self._sums)], count - self._count
        elif self._means is not None:  # an epoch ended inside the window: the rest of the previous one too
            rest = self._means.sums.tolist()
            window = ([now + end - before for now, end, before in zip(sums, rest, self._sums)],
                      count + self._means.count - self._count)
        else:
            window = sums, count
        self._means, self._sums, self._count = means, sums, count
        return window

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._logged or not (step % self.every == 0 or step == self.total_steps) \
                or not trainer.is_global_zero or self.curves.failed:
            return
        self._logged = step
        now = time.perf_counter()
        point = {"train/step/lr": float(trainer.optimizers[0].param_groups[-1]["lr"])}
        means = getattr(pl_module, "train_means", None)
        if means is not None:
            (loss, accuracy), samples = self._window(means)
            seconds = now - self._mark - self._validating_s
            if samples:
                point.update({"train/step/loss": loss / samples, "train/step/acc": accuracy / samples})
                if seconds > 0:  # a timing: the run report's (FitResult.images_per_s), never the curves' files
                    self.rates.append(samples * trainer.world_size / seconds)
        self._mark, self._validating_s = now, 0.0
        self.curves.log_metrics(point, step=step)

    def on_train_epoch_start(self, trainer, pl_module):
        # The previous epoch's validation and epoch means were logged after its last checkpoint.
        if trainer.is_global_zero and trainer.current_epoch > 0:
            self.curves.save_state()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.curves.save_state()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.is_global_zero:  # before the checkpoint file is written: the state is never older than it
            self.curves.save_state()


# ---------------------------------------------------------------- per-rank step times


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


TrainData = SplitShards | InMemorySplit | TaskArrays


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
    curves_dir: str | Path | None = None,
) -> FitResult:
    """Train `module` for exactly `total_steps` optimizer steps, resuming from `checkpoint_dir` if possible.

    `extra_callbacks` observe the run without changing it (the benchmarks record losses and
    test accuracy through them). Rank 0 logs the training curves with DVCLive into `curves_dir`
    (default: curves_workdir(checkpoint_dir)); the stage publishes them (publish_curves).
    """
    quiet_lightning()
    check_distributed(trainer_cfg)
    L.seed_everything(seed, workers=True, verbose=False)
    started = time.perf_counter()
    resume = storage.join(checkpoint_dir, f"{RESUME_NAME}.ckpt")
    ckpt_path = resume if storage.exists(resume) else None
    resumed_from, curve_files = 0, None
    curve_state = storage.join(checkpoint_dir, CURVES_STATE)
    if ckpt_path:
        # Read before fit: Lightning restores global_step only after on_fit_start, too late to report.
        resumed_from = int(torch.load(io.BytesIO(storage.read_bytes(ckpt_path)), map_location="cpu",
                                      weights_only=False)["global_step"])
        curve_files = read_curve_state(curve_state, resumed_from)
    curves = CurveLogger(curves_dir if curves_dir is not None else curves_workdir(checkpoint_dir), label, curve_files,
                         state_uri=curve_state)
    step_times = StepTimes(label)
    train_curves = TrainCurves(curves, total_steps, curve_interval(total_steps, trainer_cfg.log_every_n_steps))
    callbacks: list[Callback] = [
        train_curves,  # before ResumeCheckpoint: a checkpoint
        ResumeCheckpoint(resume, stage.checkpoint_every_n_steps),  # at step N then carries the curves' point N
        StopTogether(),  # a SIGTERM on any rank stops all ranks at one step, where ResumeCheckpoint saves
        ProgressLines(label, total_steps, trainer_cfg.log_every_n_steps, resumed_from),
        step_times,
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
        logger=curves,  # DVCLive; rank 0 writes (TrainCurves per step, the module's self.log per epoch)
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
    if trainer.is_global_zero:
        curves.settle()
    val_acc = trainer.callback_metrics.get("val/acc")
    wall_time_s = round(time.perf_counter() - started, 3)
    return FitResult(
        module=module,
        best_path=_best_path(best, checkpoint_dir),
        steps=trainer.global_step,
        resumed_from_step=resumed_from,
        wall_time_s=wall_time_s,
        val_accuracy=float(val_acc) if val_acc is not None else None,
        best_score=float(best.best_model_score) if best is not None and best.best_model_score is not None else None,
        is_global_zero=trainer.is_global_zero,
        world_size=trainer.world_size,
        device_kind=device_kind(trainer),
        device_hours=round(wall_time_s * trainer.world_size / 3600, 6),
        step_time=step_times.report,
        images_per_s=round(statistics.median(train_curves.rates), 1) if train_curves.rates else None,
        curves_dir=curves.directory if trainer.is_global_zero and not curves.failed
        and curves.directory.is_dir() else None,
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

