"""Training curves for people and for the flow: read the runs' DVCLive folders, write one JSON and one PNG.

During fit, rank 0 logs each run's curves with DVCLive (pipeline/training/curve_logging.py: CurveLogger, TrainCurves),
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

CURVES_DIR = "curves"  # the training stages publish their DVCLive folder under this name (pipeline/training/)
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
    return _png(figure, path)


def render_confusion_png(csv_path: str | Path, path: str | Path | None = None) -> bytes:
    """reports/confusion.csv (columns `actual`, `predicted`, a row per test image) as a count matrix PNG:
    what `dvc plots show` draws with DVC's confusion template."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(csv.DictReader(io.StringIO(Path(csv_path).read_text(encoding="utf-8"))))
    classes = sorted({row[k] for row in rows for k in ("actual", "predicted")},
                     key=lambda c: (0, int(c)) if c.isdigit() else (1, c))
    index = {name: i for i, name in enumerate(classes)}
    counts = [[0] * len(classes) for _ in classes]
    for row in rows:
        counts[index[row["actual"]]][index[row["predicted"]]] += 1
    figure = Figure(figsize=(1.2 + 0.5 * max(len(classes), 4), 1.0 + 0.5 * max(len(classes), 4)), dpi=100,
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.imshow(counts, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes)
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    axes.set_title(f"Confusion matrix ({len(rows)} test images)")
    peak = max((max(r) for r in counts), default=0)
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            if count:
                axes.text(j, i, str(count), ha="center", va="center", fontsize=8,
                          color="white" if count > peak / 2 else "black")
    return _png(figure, path)


def _png(figure, path: str | Path | None) -> bytes:
    """The figure as PNG bytes, also written to `path` when one is given."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def write_plots(root: str | Path = ".", out: str | Path = "dvc_plots") -> list[Path]:
    """What `dvc plots show` draws, as PNGs that need no browser, no internet and no Vega: `out/curves.png`
    (dvc.yaml's top-level plots: pretraining loss, fine-tuned vs scratch training loss and validation
    accuracy) and `out/confusion.png` (reports/confusion.csv), from the outputs under `root`
    (a `dvc repro` checkout, or a `make run` workspace such as runs/latest). Returns the files written."""
    root, out = Path(root), Path(out)
    written = []
    curves = read_curves(run_dirs(str(root / "models" / "pretrain"), str(root / "models" / "finetune")))
    confusion = root / "reports" / "confusion.csv"
    if curves or confusion.is_file():
        out.mkdir(parents=True, exist_ok=True)
    if curves:
        render_png(curves, out / CURVES_PNG)
        written.append(out / CURVES_PNG)
    if confusion.is_file():
        render_confusion_png(confusion, out / "confusion.png")
        written.append(out / "confusion.png")
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.curves [ROOT] [--out DIR]`: write_plots; exit 2 when ROOT has no curves and no
    confusion matrix yet (run `dvc repro` or `make run` first)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipeline.curves", description=write_plots.__doc__)
    parser.add_argument("root", nargs="?", default=".", help="project or run workspace (default: .)")
    parser.add_argument("--out", default="dvc_plots", help="folder for the PNGs (default: dvc_plots, "
                        "where `dvc plots show` writes its index.html)")
    args = parser.parse_args(argv)
    written = write_plots(args.root, args.out)
    if not written:
        print(f"no training curves and no reports/confusion.csv under {args.root}: run `dvc repro` or "
              "`make run` first", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
