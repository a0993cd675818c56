"""Training curves written during fit (rank 0, DVCLive files only), resumable with the run.

The stage publishes a run's folder in its output (driver.publish_curves) under CURVES_DIR;
pipeline/curves.py reads the same files back for the model card, the Prefect artifact and plots.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from argparse import Namespace
from pathlib import Path

from dvclive import Live
from dvclive.fabric import DVCLiveLogger as _FabricDVCLiveLogger
from dvclive.lightning import DVCLiveLogger
from lightning.fabric.loggers.logger import _DummyExperiment, rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from pipeline import storage
from pipeline.curves import CURVES_DIR

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
