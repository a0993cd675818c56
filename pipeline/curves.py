"""Training curves for people and for the flow: read the runs' DVCLive folders, write one JSON and one PNG.

During fit, rank 0 logs each run's curves with DVCLive (pipeline/training.py: CurveLogger, TrainCurves),
and each training stage publishes the run's DVCLive folder inside its own DVC output:

    <pretrain output>/curves/               pretraining                      (models/pretrain/curves/)
    <finetune output>/curves/finetuned/     fine-tuned from the pretrained backbone
    <finetune output>/curves/scratch/       the scratch baseline (same label budget)

Each folder holds `plots/metrics/train/step/{loss,acc,lr,images_per_s}.tsv` (a row every
trainer.log_every_n_steps optimizer steps, and at the last step; loss and accuracy are means over the
steps since the previous row), `plots/metrics/{train,val}/{loss,acc}.tsv` (a row per epoch),
`metrics.json` (the latest values) and `params.yaml` (the module's hyper-parameters). Every TSV has
columns `step` and the value. dvc.yaml's top-level `plots:` draws them (`dvc plots show`).

`evaluate` puts both of this module's products in the release: `curves.json` (read_curves: series name ->
[[step, value], ...], small enough for a Prefect artifact) and `curves.png` (render_png), and the model
card points at the PNG. Light on purpose: no torch, matplotlib only inside render_png.

    from pipeline.curves import read_curves, render_png, run_dirs
    curves = read_curves(run_dirs("models/pretrain", "models/finetune"))   # local paths or s3:// URIs
    render_png(curves, "curves.png")
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from pathlib import Path

from pipeline import storage

CURVES_DIR = "curves"  # pipeline/training.py publishes under the same name (training.CURVES_DIR)
CURVES_JSON = "curves.json"
CURVES_PNG = "curves.png"  # the model card's "curves" entry (pipeline/model_card.py renders it)
RUNS = ("pretrain", "finetuned", "scratch")
# curves.json series "<run>/<name>" -> DVCLive file under plots/metrics/ and its value column.
SERIES = {
    "train_loss": ("train/step/loss.tsv", "loss"),
    "train_acc": ("train/step/acc.tsv", "acc"),
    "lr": ("train/step/lr.tsv", "lr"),
    "images_per_s": ("train/step/images_per_s.tsv", "images_per_s"),
    "val_loss": ("val/loss.tsv", "loss"),
    "val_acc": ("val/acc.tsv", "acc"),
}
MAX_POINTS = 400  # per series in curves.json: evenly thinned beyond this, first and last points kept

Point = list  # [step, value], value a finite float


def run_dirs(pretrain_uri: str, finetune_uri: str) -> dict[str, str]:
    """The DVCLive folder of each run, given the pretrain and finetune stage outputs (paths or URIs)."""
    return {
        "pretrain": storage.join(pretrain_uri, CURVES_DIR),
        "finetuned": storage.join(finetune_uri, CURVES_DIR, "finetuned"),
        "scratch": storage.join(finetune_uri, CURVES_DIR, "scratch"),
    }


def read_series(uri: str, column: str) -> list[Point]:
    """One DVCLive TSV (columns `step` and `column`) -> [[step, value], ...] in file order.

    Rows whose value is NaN or infinite (a diverged run; DVCLive writes them as text) are left out:
    JSON has no NaN, and a reader can take every value as a number.
    """
    text = storage.read_bytes(uri).decode("utf-8")
    points = []
    for row in csv.DictReader(io.StringIO(text), delimiter="\t"):
        try:
            value = float(row[column])
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            points.append([int(row["step"]), value])
    return points


def thin(points: list[Point], max_points: int = MAX_POINTS) -> list[Point]:
    """At most `max_points` evenly spaced points, the first and the last always among them."""
    if len(points) <= max_points:
        return points
    stride = (len(points) - 1) / (max_points - 1)
    return [points[round(i * stride)] for i in range(max_points)]


def read_curves(runs: Mapping[str, str], max_points: int = MAX_POINTS) -> dict[str, list[Point]]:
    """{"<run>/<series>": [[step, value], ...]} of every series the runs' DVCLive folders hold.

    `runs`: run name -> DVCLive folder (path or URI), e.g. run_dirs(...). Series are SERIES' names
    (train_loss, train_acc, lr, images_per_s: per logged step; val_loss, val_acc: per epoch). A run or
    file that is missing (no scratch baseline; a run whose logger could not write) is left out.
    """
    curves: dict[str, list[Point]] = {}
    for run, folder in runs.items():
        for name, (file, column) in SERIES.items():
            uri = storage.join(folder, "plots", "metrics", *file.split("/"))
            if storage.exists(uri):
                points = read_series(uri, column)
                if points:
                    curves[f"{run}/{name}"] = thin(points, max_points)
    return curves


# (title, y label, [(series, legend label)]): what the PNG shows, one panel each.
PANELS = (
    ("Pretraining loss", "loss", [("pretrain/train_loss", "train"), ("pretrain/val_loss", "validation")]),
    ("Fine-tuning: training loss", "loss", [("finetuned/train_loss", "fine-tuned"), ("scratch/train_loss", "scratch")]),
    ("Fine-tuning: validation accuracy", "accuracy",
     [("finetuned/val_acc", "fine-tuned"), ("scratch/val_acc", "scratch")]),
)


def render_png(curves: Mapping[str, list[Point]], path: str | Path | None = None) -> bytes:
    """The curves as one PNG (three panels: PANELS) -> its bytes; written to `path` too when given.

    Matplotlib's Agg canvas on a bare Figure: no pyplot, no global backend switch, no display needed.
    A panel without data says so instead of failing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (title, ylabel, series) in zip(figure.subplots(1, len(PANELS)), PANELS):
        drawn = 0
        for name, label in series:
            points = [(step, value) for step, value in curves.get(name, []) if value is not None]  # None: tolerated
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, label=label, marker="o" if len(points) < 30 else None, markersize=3)
                drawn += 1
        axes.set_title(title)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if drawn:
            axes.legend()
        else:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="grey")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data
