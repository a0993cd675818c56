"""Training curves (DVCLive, per step and per epoch), their release copies, per-rank step times and device-hours.

The stage-level checks read the session's tiny in-process run (tiny_run: trainer.log_every_n_steps=1);
the others call training.fit on a small in-memory task, a few seconds each.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pipeline import curves as curves_module
from pipeline import storage
from pipeline.config import FinetuneConfig, TrainerConfig
from pipeline.curves import CURVES_JSON, CURVES_PNG, read_curves, render_png, run_dirs, thin
from pipeline.data.stream import InMemorySplit
from pipeline.model_card import with_run_report
from pipeline.models.classifier import Classifier
from pipeline.errors import Terminated
from tests.conftest import read_json
from pipeline.training import CURVES_DIR, FitPlan, fit
from pipeline.training.callbacks import step_time_report
from pipeline.training.curve_logging import CURVES_STATE, FilesOnlyLive, curves_workdir, read_curve_state

pytest_plugins = ["tests.s3_fixtures"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _steps(path: Path) -> list[int]:
    return [int(row["step"]) for row in _tsv(path)]


def _values(path: Path, column: str) -> list[float]:
    return [float(row[column]) for row in _tsv(path)]



# ---------------------------------------------------------------- the stages' curves (tiny in-process run)


def _run_folders(root: Path) -> dict[str, Path]:
    return {"pretrain": root / "models/pretrain" / CURVES_DIR,
            "finetuned": root / "models/finetune" / CURVES_DIR / "finetuned",
            "scratch": root / "models/finetune" / CURVES_DIR / "scratch"}


def test_each_training_run_logs_curves_per_step_and_per_epoch(tiny_run):
    root, cfg, results = tiny_run
    assert cfg.trainer.log_every_n_steps == 1
    corpus_train = read_json(root / "data/corpus/manifest.json")["split_counts"]["train"]
    budget = results["finetune"]["labelled_images"]
    plans = {"pretrain": (cfg.pretrain.epochs, cfg.pretrain.steps_per_epoch(corpus_train, 1)),
             "finetuned": (cfg.finetune.epochs, cfg.finetune.steps_per_epoch(budget, 1)),
             "scratch": (cfg.finetune.epochs, cfg.finetune.steps_per_epoch(budget, 1))}
    for run, folder in _run_folders(root).items():
        epochs, per_epoch = plans[run]
        metrics = folder / "plots" / "metrics"
        total = epochs * per_epoch
        # One row per logged step (every step here), numbered by optimizer steps done: 1 .. total.
        for name in ("loss", "acc", "lr"):
            assert _steps(metrics / "train" / "step" / f"{name}.tsv") == list(range(1, total + 1)), (run, name)
        # Throughput is a timing: the run report's (images_per_s), never in an output (byte-identical recomputation).
        assert not (metrics / "train" / "step" / "images_per_s.tsv").exists()
        losses = _values(metrics / "train/step/loss.tsv", "loss")
        assert all(math.isfinite(v) and v > 0 for v in losses), (run, losses)
        assert all(0.0 <= v <= 1.0 for v in _values(metrics / "train/step/acc.tsv", "acc"))
        lrs = _values(metrics / "train/step/lr.tsv", "lr")
        assert all(math.isfinite(v) and v > 0 for v in lrs) and lrs[0] != lrs[-1]  # the schedule moves it
        # One row per epoch, at the step that ended it.
        epoch_ends = [per_epoch * (e + 1) for e in range(epochs)]
        for split, name in (("train", "loss"), ("train", "acc"), ("val", "loss"), ("val", "acc")):
            assert _steps(metrics / split / f"{name}.tsv") == epoch_ends, (run, split, name)
        assert all(math.isfinite(v) for v in _values(metrics / "val/loss.tsv", "loss"))
        summary = read_json(folder / "metrics.json")
        assert summary["step"] == total and set(summary["val"]) == {"loss", "acc"}
        assert (folder / "params.yaml").exists()
        assert not list(folder.rglob("dvc.yaml")) and not (folder / "report.html").exists()  # DVC integration off
    # The last epoch's validation accuracy in the curves is the one the summary reports.
    finetune = read_json(root / "models/finetune/summary.json")
    last_val = _values(_run_folders(root)["finetuned"] / "plots/metrics/val/acc.tsv", "acc")[-1]
    assert last_val == pytest.approx(finetune["finetuned"]["val_accuracy"])


def test_run_reports_record_step_times_and_device_hours(tiny_run):
    root, _, _ = tiny_run
    pretrain = read_json(root / "reports/usage/pretrain.json")  # run reports (pipeline/runinfo.py), not the outputs
    finetune = read_json(root / "reports/usage/finetune.json")
    for run in (pretrain, finetune["finetuned"], finetune["scratch"]):
        timing = run["step_time"]
        assert len(timing["per_rank_ms"]) == 1 and timing["per_rank_ms"][0] > 0
        assert timing["slowest_rank"] == 0 and timing["slowest_ratio"] == 1.0
        assert run["device_kind"] == "cpu"
        assert run["device_hours"] == pytest.approx(run["wall_time_s"] / 3600, abs=2e-6)
        assert run["images_per_s"] > 0
    assert finetune["device_hours"] == pytest.approx(
        finetune["finetuned"]["device_hours"] + finetune["scratch"]["device_hours"], abs=2e-6)
    for data in ("prepare", "corpus"):
        summary = read_json(root / "reports/usage" / f"{data}.json")
        assert summary["device_kind"] == "cpu" and summary["device_hours"] > 0


def test_release_has_the_curves_and_the_card_has_curves_and_device_hours(tiny_run):
    root, _, _ = tiny_run
    release = root / "models/release"
    data = read_json(release / CURVES_JSON)
    expected = {f"{run}/{series}" for run in ("pretrain", "finetuned", "scratch") for series in curves_module.SERIES
                if series != "images_per_s"}  # a timing: the run reports', not the curves'
    assert set(data) == expected
    assert data == read_curves(run_dirs(str(root / "models/pretrain"), str(root / "models/finetune")))
    for name, points in data.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)) and all(math.isfinite(value) for _, value in points), name
    assert (release / CURVES_PNG).read_bytes().startswith(PNG_MAGIC)

    card = read_json(release / "model_card.json")
    assert card["curves"] == CURVES_PNG
    assert "![curves](curves.png)" in (release / "model_card.md").read_text()
    card = with_run_report(card, read_json(root / "reports/usage/evaluate.json"))  # what the registry's card shows
    hours = card["device_hours"]
    assert set(hours["stages"]) == {"prepare", "corpus", "pretrain", "finetune", "evaluate"}
    assert all(usage["kind"] == "cpu" and usage["hours"] > 0 for usage in hours["stages"].values())
    assert hours["total"]["cpu"] == pytest.approx(sum(u["hours"] for u in hours["stages"].values()), abs=1e-5)
    assert set(card["step_time"]) == {"pretrain", "finetune/finetuned", "finetune/scratch"}
    assert all(t["per_rank_ms"][0] > 0 for t in card["step_time"].values())


@pytest.mark.slow
def test_dvc_plots_show_draws_the_curves_and_exp_show_works(tiny_run, tmp_path):
    """dvc.yaml's top-level plots against the files the stages wrote, with real DVC in a throwaway project."""
    import shutil

    from tests.conftest import REPO_ROOT, dvc_env

    root, _, _ = tiny_run
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO_ROOT / name, project / name)
    shutil.copytree(root / "models", project / "models")
    env = dvc_env(own_code=False)
    dvc = str(Path(sys.executable).parent / "dvc")

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    run("git", "add", "dvc.yaml", "params.yaml", ".dvc")
    run("git", "commit", "-qm", "project")
    shown = json.loads(run(dvc, "plots", "show", "--json"))["data"]
    for plot, runs in (("pretrain_loss", ["train/step/loss.tsv", "val/loss.tsv"]),
                       ("finetune_train_loss", ["finetuned", "scratch"]),
                       ("finetune_val_accuracy", ["finetuned", "scratch"])):
        assert plot in shown, list(shown)
        rows = shown[plot][0]["content"]["data"]["values"]
        assert rows and all(float(row["step"]) >= 1 for row in rows)
        files = {row["filename"] for row in rows}
        assert all(any(name in file for file in files) for name in runs), (plot, files)  # both runs on one plot
    json.loads(run(dvc, "exp", "show", "--json"))  # and the experiments table does not choke on them


# ---------------------------------------------------------------- fit on a small in-memory task


def _task(samples: int = 96, classes: int = 4, seed: int = 0) -> InMemorySplit:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, samples)
    images = rng.integers(0, 60, (samples, 8, 8, 1)).astype(np.uint8)
    for index, label in enumerate(labels):  # a learnable signal: a bright quadrant per class
        row, col = divmod(int(label), 2)
        images[index, row * 4:row * 4 + 4, col * 4:col * 4 + 4] += 150
    return InMemorySplit(images, labels.astype(np.int64))


def _fit(tmp: Path, every: int = 1, checkpoint_every: int = 100, callbacks=(), curves_dir=None, epochs: int = 2,
         checkpoints: str = "checkpoints"):
    stage = FinetuneConfig(epochs=epochs, batch_size=16, checkpoint_every_n_steps=checkpoint_every)
    trainer = TrainerConfig(log_every_n_steps=every)
    train, val = _task(), _task(48, seed=1)
    total = epochs * stage.steps_per_epoch(train.samples, 1)
    torch.manual_seed(0)
    module = Classifier(model={"width": 4, "depth": 1, "dropout": 0.1}, image_shape=(1, 8, 8), num_classes=4,
                        optimizer={}, schedule={}, total_steps=total, lr=0.01)
    checkpoint_dir = checkpoints if "://" in checkpoints else str(tmp / checkpoints)
    plan = FitPlan(label="curves-test", stage=stage, trainer=trainer, seed=0, checkpoint_dir=checkpoint_dir,
                   total_steps=total, lr=0.01, curves_dir=curves_dir, observers=tuple(callbacks))
    result = fit(module, train, val, plan)
    return result, total


def test_rows_every_log_every_n_steps_and_at_the_last_step(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.training.curve_logging.CURVE_POINTS", 1)  # else a 12-step run logs every step (curve_interval)
    result, total = _fit(tmp_path, every=4, epochs=2)  # 6 steps an epoch: 12 in all
    assert total == 12
    folder = result.curves_dir
    assert folder == curves_workdir(str(tmp_path / "checkpoints"))
    assert _steps(folder / "plots/metrics/train/step/loss.tsv") == [4, 8, 12]
    assert _steps(folder / "plots/metrics/val/acc.tsv") == [6, 12]
    # A row's loss is the mean over the steps since the previous row, across the epoch boundary too.
    assert all(math.isfinite(v) for v in _values(folder / "plots/metrics/train/step/loss.tsv", "loss"))


class _FailAt(Callback):
    def __init__(self, step: int, error: BaseException):
        self.step, self.error = step, error

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise self.error


def test_resume_continues_the_curves_without_repeating_a_step(tmp_path):
    reference, total = _fit(tmp_path / "reference")
    ref_folder = reference.curves_dir / "plots/metrics"

    # A crash at step 7 with the last checkpoint at step 4: the rows of steps 5-7 are dropped on resume,
    # and the resumed run logs them again, once. A SIGTERM at step 9 checkpoints there, then resumes.
    run = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="crash"):
        _fit(run, checkpoint_every=4, callbacks=[_FailAt(7, RuntimeError("crash"))])
    folder = curves_workdir(str(run / "checkpoints"))
    assert _steps(folder / "plots/metrics/train/step/loss.tsv") == list(range(1, 8))  # the crashed run logged 1-7
    with pytest.raises(Terminated):
        _fit(run, checkpoint_every=4, callbacks=[_FailAt(9, SIGTERMException())])
    checkpoint = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 9
    state = json.loads((run / "checkpoints" / CURVES_STATE).read_text())["files"]  # saved with the checkpoint
    assert _steps_in(state["plots/metrics/train/step/loss.tsv"]) == list(range(1, 10))
    resumed, _ = _fit(run, checkpoint_every=4)
    assert resumed.resumed_from_step == 9 and resumed.steps == total
    metrics = resumed.curves_dir / "plots/metrics"
    for name in ("loss", "acc", "lr"):
        assert _steps(metrics / f"train/step/{name}.tsv") == list(range(1, total + 1)), name
        # Exact resume (same batches, same RNG): the same curve as the uninterrupted run's.
        assert _values(metrics / f"train/step/{name}.tsv", name) == pytest.approx(
            _values(ref_folder / f"train/step/{name}.tsv", name), rel=1e-5), name
    assert _steps(metrics / "val/acc.tsv") == _steps(ref_folder / "val/acc.tsv") == [6, 12]
    assert _values(metrics / "val/acc.tsv", "acc") == pytest.approx(_values(ref_folder / "val/acc.tsv", "acc"))

    # Re-run once finished (`dvc repro -f`, a flow retry): it resumes at the end and the curves stay as they were,
    # the last epoch's validation (logged after the last checkpoint) included.
    before = {p.relative_to(resumed.curves_dir): p.read_text() for p in resumed.curves_dir.rglob("*.tsv")}
    again, _ = _fit(run, checkpoint_every=4)
    assert again.resumed_from_step == total
    assert {p.relative_to(again.curves_dir): p.read_text() for p in again.curves_dir.rglob("*.tsv")} == before


def test_resume_from_an_epochs_last_step_keeps_that_epochs_validation_once(tmp_path):
    # The checkpoint at step 6 (the end of epoch 0) is written before that epoch's validation, which the
    # resumed run does not repeat: the state saved at the next epoch's start has it.
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash"):
        _fit(run, checkpoint_every=6, callbacks=[_FailAt(8, RuntimeError("crash"))])
    resumed, total = _fit(run, checkpoint_every=6)
    assert resumed.resumed_from_step == 6
    metrics = resumed.curves_dir / "plots/metrics"
    assert _steps(metrics / "val/acc.tsv") == _steps(metrics / "train/loss.tsv") == [6, 12]
    assert _steps(metrics / "train/step/loss.tsv") == list(range(1, total + 1))


@pytest.mark.slow
def test_checkpoints_on_s3_resume_the_curves_from_a_fresh_machine(s3, tmp_path):
    """Kubernetes: checkpoints in a bucket, the pod (and its local curves folder) gone before the retry."""
    import shutil

    checkpoints = s3.uri("checkpoints", "curves-test")
    with pytest.raises(RuntimeError, match="crash"):
        _fit(tmp_path, checkpoint_every=4, callbacks=[_FailAt(7, RuntimeError("crash"))], checkpoints=checkpoints)
    assert storage.exists(storage.join(checkpoints, CURVES_STATE))
    local = curves_workdir(checkpoints)
    assert local.is_relative_to(tempfile.gettempdir())
    shutil.rmtree(local)  # a new pod
    resumed, total = _fit(tmp_path, checkpoint_every=4, checkpoints=checkpoints)
    assert resumed.resumed_from_step == 4 and resumed.curves_dir == local
    assert _steps(local / "plots/metrics/train/step/loss.tsv") == list(range(1, total + 1))
    assert _steps(local / "plots/metrics/val/acc.tsv") == [6, 12]
    shutil.rmtree(local)


def test_curve_state_is_cut_back_to_the_resumed_step(tmp_path):
    state = tmp_path / CURVES_STATE
    state.write_text(json.dumps({"files": {"plots/metrics/val/acc.tsv": "step\tacc\n6\t0.5\n12\t0.7\n",
                                           "metrics.json": "{}"}}))
    assert read_curve_state(str(state), 6) == {"plots/metrics/val/acc.tsv": "step\tacc\n6\t0.5\n",
                                               "metrics.json": "{}"}
    assert read_curve_state(str(tmp_path / "missing.json"), 6) is None


def _steps_in(tsv_text: str) -> list[int]:
    return [int(line.split("\t")[0]) for line in tsv_text.splitlines()[1:]]


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "warning" in line.lower()]


def test_a_curves_folder_that_cannot_be_written_costs_one_warning_not_the_run(tmp_path, capsys):
    # Read-only for everyone, root included: the folder's parent is a file.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result, total = _fit(tmp_path / "a", curves_dir=blocker / "curves")
    assert result.steps == total and result.curves_dir is None
    out, err = capsys.readouterr()
    warnings = _warnings(out + err)
    assert len(warnings) == 1, out + err
    assert "[curves-test] warning: no training curves" in warnings[0] and "training continues" in warnings[0]

    # The folder disappears mid-run (a full or unmounted disk): the same, one warning, training goes on.
    class _Vandal(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                folder = tmp_path / "b" / "curves"
                import shutil

                shutil.rmtree(folder)
                folder.write_text("")

    result, total = _fit(tmp_path / "b", callbacks=[_Vandal()], curves_dir=tmp_path / "b" / "curves")
    assert result.steps == total and result.curves_dir is None
    out, err = capsys.readouterr()
    assert len(_warnings(out + err)) == 1, out + err


@pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0, reason="needs git")
def test_dvclive_touches_neither_git_nor_dvc(tmp_path, monkeypatch):
    """Inside a git + DVC repository, as under `dvc repro`: only the curve files are written."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "README").write_text("x")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "x"], cwd=repo, check=True)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_ROOT", str(repo))  # what `dvc repro` sets for a stage
    live = FilesOnlyLive(dir="out/curves", save_dvc_exp=False, dvcyaml=False)
    live.log_metric("train/step/loss", 1.0)
    live.end()
    assert live._dvc_repo is None
    assert not (repo / ".dvc").exists()  # a plain Live() would `dvc init` this git repository
    assert not (repo / "dvc.yaml").exists() and not list(repo.rglob("dvc.yaml"))
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert status.split() == ["??", "out/"]  # nothing staged or committed


# ---------------------------------------------------------------- pure helpers


def test_step_time_report_names_the_slowest_rank():
    report = step_time_report([10.0, 13.0, 10.5, None])
    assert report["per_rank_ms"] == [10.0, 13.0, 10.5, None]
    assert report["median_ms"] == 10.5 and report["slowest_rank"] == 1
    assert report["slowest_ratio"] == pytest.approx(13.0 / 10.5, abs=1e-3)
    assert step_time_report([None, None]) is None


def test_read_curves_thins_long_series_and_skips_missing_runs(tmp_path):
    folder = tmp_path / "pretrain" / "plots" / "metrics" / "train" / "step"
    folder.mkdir(parents=True)
    rows = "".join(f"{step}\t{'nan' if step == 7 else 1.0 / step}\n" for step in range(1, 1001))
    (folder / "loss.tsv").write_text("step\tloss\n" + rows)
    curves = read_curves({"pretrain": str(tmp_path / "pretrain"), "scratch": str(tmp_path / "missing")}, max_points=50)
    assert list(curves) == ["pretrain/train_loss"]
    points = curves["pretrain/train_loss"]
    assert len(points) == 50 and points[0] == [1, 1.0] and points[-1][0] == 1000
    assert [step for step, _ in thin([[s, 0.0] for s in range(1, 11)], 4)] == [1, 4, 7, 10]
    full = read_curves({"pretrain": str(tmp_path / "pretrain")}, max_points=1000)["pretrain/train_loss"]
    assert len(full) == 999 and 7 not in [step for step, _ in full]  # NaN rows are left out
    json.dumps(curves, allow_nan=False)  # valid JSON for any reader, every value a number


def test_render_png_draws_what_there_is(tmp_path):
    png = render_png({"pretrain/train_loss": [[1, 2.0], [2, 1.5]], "finetuned/val_acc": [[4, 0.5], [8, 0.6]]},
                     tmp_path / "curves.png")
    assert png.startswith(PNG_MAGIC) and (tmp_path / "curves.png").read_bytes() == png
    assert render_png({}).startswith(PNG_MAGIC)  # no data at all: still a picture (panels say "no data")


def test_short_runs_get_enough_curve_points():
    from pipeline.training.curve_logging import CURVE_POINTS, curve_interval

    assert curve_interval(60, 20) == 1  # the default fine-tuning: 60 points, not 3
    assert curve_interval(540, 20) == 5 and 540 // 5 >= CURVE_POINTS  # the default pretraining: 108 points
    assert curve_interval(100_000, 20) == 20  # long runs: trainer.log_every_n_steps
