"""How people see the curves without a browser or the internet: the `curves` Prefect artifact's markdown
(flows/summary.py: the release's PNG embedded, learning rates readable) and `python -m pipeline.curves`
(PNGs of what `dvc plots show` draws)."""
from __future__ import annotations

import base64
import csv
import subprocess

from flows.summary import curves_markdown, format_value
from pipeline.curves import main, render_png, write_plots
from tests.conftest import PYTHON, REPO_ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CURVES = {"finetuned/lr": [[i, 3e-3 * (1 - i / 60) + 3e-5] for i in range(1, 61)],
          "finetuned/train_loss": [[i, 2.0 / i] for i in range(1, 61)],
          "finetuned/val_acc": [[2 * i, 0.5 + i / 100] for i in range(1, 31)]}


def test_learning_rates_are_printed_readably():
    assert format_value("pretrain/lr", 3e-5) == "3.00e-05"
    assert format_value("finetuned/train_loss", 0.12345) == "0.1235"
    text = curves_markdown(CURVES, points_per_series=4)
    assert "| 60 | 3.00e-05 |" in text and "0.0000" not in text
    assert "**finetuned/lr** (60 points)" in text


def test_the_artifact_embeds_the_release_png_and_names_its_path(tmp_path):
    png = render_png(CURVES, tmp_path / "curves.png")
    text = curves_markdown(CURVES, release=str(tmp_path))
    first = text.splitlines()[0]
    assert first.startswith("![training curves](data:image/png;base64,")
    assert base64.b64decode(first.split(",", 1)[1].rstrip(")")) == png
    assert f"`{tmp_path / 'curves.png'}`" in text
    # No PNG in the release (an old one): the tables alone, no broken image.
    assert "![" not in curves_markdown(CURVES, release=str(tmp_path / "missing"))


def _workspace(root):
    for run, folder in (("pretrain", "models/pretrain/curves"), ("finetuned", "models/finetune/curves/finetuned"),
                        ("scratch", "models/finetune/curves/scratch")):
        metrics = root / folder / "plots" / "metrics"
        (metrics / "train" / "step").mkdir(parents=True)
        (metrics / "val").mkdir(parents=True)
        (metrics / "train" / "step" / "loss.tsv").write_text("step\tloss\n" + "".join(f"{i}\t{1 / i}\n" for i in range(1, 60)))
        (metrics / "val" / "acc.tsv").write_text("step\tacc\n10\t0.5\n20\t0.7\n")
        (metrics / "val" / "loss.tsv").write_text("step\tloss\n10\t0.9\n20\t0.5\n")
    (root / "reports").mkdir()
    with (root / "reports" / "confusion.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows([("0", "0"), ("1", "1"), ("1", "0"), ("10", "10")])


def test_offline_plots_are_pngs_of_what_dvc_plots_draws(tmp_path):
    _workspace(tmp_path)
    written = write_plots(tmp_path, tmp_path / "dvc_plots")
    assert [p.name for p in written] == ["curves.png", "confusion.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in written)


def test_the_command_line_writes_the_pngs_and_exit_2_without_outputs(tmp_path):
    _workspace(tmp_path / "ws")
    done = subprocess.run([PYTHON, "-m", "pipeline.curves", str(tmp_path / "ws"), "--out", str(tmp_path / "out")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["confusion.png", "curves.png"]
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()  # nothing half-written
