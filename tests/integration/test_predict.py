"""`pipeline predict` in real subprocesses on a tiny run's release: evaluate's predictions reproduced from PNG
files, champion/RUN/URI resolution, CSV and JSON output, exit 2 naming bad inputs and refusing tampered models
(nothing executed), and the Markdown model card beside the JSON, re-rendered with the promotion decision."""
from __future__ import annotations

import collections
import csv
import json
import pickle
import shutil
from pathlib import Path

import pytest

from flows.promotion import decide
from pipeline.data.prepared import load_prepared
from tests.conftest import run_cli, write_png

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def test_images(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's test split as PNG files, `<class>/<n>.png`, straight from the prepared shards."""
    root, _, _ = tiny_run
    data = load_prepared(str(root / "data" / "prepared"))
    test = data.subset("test")
    folder = tmp_path_factory.mktemp("test-images")
    for i, (pixels, label) in enumerate(zip(test.images, test.labels)):
        write_png(folder / data.class_names[label] / f"{i:04d}.png", pixels[..., 0])
    return folder


class _Payload:
    """Unpickling this copies a file to `marker`: proof of code run at load time."""

    def __init__(self, source: str, marker: Path):
        self.source, self.marker = source, marker

    def __reduce__(self):
        return (shutil.copy, (self.source, str(self.marker)))


def _lines(stdout: str) -> list[tuple[str, str, float]]:
    return [(path, label, float(confidence)) for path, label, confidence in
            (line.split("\t") for line in stdout.splitlines())]


def _predict(cwd: Path, *args: str):
    return run_cli(["predict", *args], cwd=cwd)


def test_predict_reproduces_evaluate_on_the_test_images(tiny_run, test_images, tmp_path):
    root, _, _ = tiny_run
    release = root / "models" / "release"
    out = _predict(tmp_path, str(test_images), "--model", str(release), "--out", str(tmp_path / "p.csv"))
    assert out.returncode == 0, out.stderr
    lines = _lines(out.stdout)
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert len(lines) == manifest["split_counts"]["test"]
    assert all(0 < confidence <= 1 for _, _, confidence in lines)
    actual = [Path(path).parent.name for path, _, _ in lines]
    accuracy = sum(a == p for a, (_, p, _) in zip(actual, lines)) / len(lines)
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert round(accuracy, 6) == metrics["test"]["accuracy"]
    # Not only the accuracy: the same (actual, predicted) pairs as evaluate's confusion plot.
    confusion = list(csv.reader((root / "reports/confusion.csv").read_text().splitlines()))[1:]
    assert collections.Counter(map(tuple, confusion)) == collections.Counter(zip(actual, (p for _, p, _ in lines)))
    assert "image(s) classified" in out.stderr

    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [(r["path"], r["class"]) for r in rows] == [(path, label) for path, label, _ in lines]
    assert [round(float(r["confidence"]), 4) for r in rows] == [confidence for _, _, confidence in lines]

    one = sorted(test_images.rglob("*.png"))[0]
    out = _predict(tmp_path, str(one), "--model", str(release / "finetuned.safetensors"),
                   "--out", str(tmp_path / "sub" / "p.json"))
    assert out.returncode == 0, out.stderr
    written = json.loads((tmp_path / "sub" / "p.json").read_text())
    assert written["model"] == str(release / "finetuned.safetensors")
    assert written["classes"] == manifest["classes"] and written["transform"] == {"image_size": 8, "channels": 1}
    [prediction] = written["predictions"]
    assert prediction["path"] == str(one) and prediction["class"] in manifest["classes"]
    assert (prediction["path"], prediction["class"], round(prediction["confidence"], 4)) == _lines(out.stdout)[0]


def test_champion_and_run_names_resolve_through_the_registry(tiny_run, test_images, tmp_path):
    root, cfg, _ = tiny_run
    registry = tmp_path / "registry"
    image = str(sorted(test_images.rglob("*.png"))[0])
    use_registry = ["--set", f"paths.registry={registry}"]
    out = _predict(tmp_path, image, *use_registry)
    assert out.returncode == 2 and "no champion yet" in out.stderr and str(registry / "champion.json") in out.stderr
    outputs = {name: str(root / sub) for name, sub in
               (("reports", "reports"), ("prepared", "data/prepared"), ("release", "models/release"))}
    decision = decide(cfg, outputs, str(registry), "run-1", {"prepare": "ran", "pretrain": "restored"})
    assert decision["promoted"]
    archived = registry / "releases" / "run-1"
    archived_files = {p.name for p in archived.iterdir()}
    assert {"_COMPLETE", "finetuned.safetensors", "model_card.json", "model_card.md"} <= archived_files
    card = (archived / "model_card.md").read_text()
    curves = json.loads((archived / "model_card.json").read_text()).get("curves")
    assert not curves or (archived / curves).is_file()  # the image the card embeds is archived with it
    assert "# Model card: run-1" in card and "**Promoted**" in card and "no champion yet" in card
    assert "| `pretrain` | restored |" in card

    expected = _predict(tmp_path, image, "--model", str(root / "models/release")).stdout
    # The champion by default, or a run by name: the same model, the same output.
    for model, described in (([], "with champion, run run-1"), (["--model", "run-1"], "with run run-1")):
        out = _predict(tmp_path, image, *use_registry, *model)
        assert out.returncode == 0 and out.stdout == expected, out.stderr
        assert described in out.stderr
    out = _predict(tmp_path, image, *use_registry, "--model", "run-2")
    assert out.returncode == 2 and "--model run-2" in out.stderr and str(registry / "releases") in out.stderr

    # A second challenger is compared with the champion, loaded from its safetensors file.
    again = decide(cfg, outputs, str(registry), "run-2", {})
    assert again["champion_run"] == "run-1" and again["champion_accuracy"] is not None


def test_missing_and_non_image_files_exit_2_naming_each(tiny_run, test_images, tmp_path):
    root, _, _ = tiny_run
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "empty").mkdir()
    out = _predict(tmp_path, str(sorted(test_images.rglob("*.png"))[0]), "notes.txt", "broken.png", "missing.jpg",
                   "empty", "--model", str(root / "models/release"), "--out", str(tmp_path / "p.csv"))
    assert out.returncode == 2, out.stderr
    assert "4 data problem(s)" in out.stderr
    for name in ("notes.txt: not an image", "broken.png", "missing.jpg: no such file or folder",
                 "empty: folder holds no image files"):
        assert name in out.stderr
    assert out.stdout == "" and not (tmp_path / "p.csv").exists()  # nothing half-done
    out = _predict(tmp_path, "missing.jpg", "--model", str(root / "models/release"), "--out", "p.txt")
    assert out.returncode == 2 and "--out p.txt: must end in .csv or .json" in out.stderr


def test_tampered_or_pickled_models_exit_2_and_nothing_runs(tiny_run, test_images, tmp_path):
    root, _, _ = tiny_run
    image = str(sorted(test_images.rglob("*.png"))[0])
    marker = tmp_path / "executed"
    Payload = lambda: _Payload(image, marker)  # noqa: E731
    pickle.loads(pickle.dumps(Payload()))  # the payload is real: unpickling it creates the marker
    assert marker.exists()
    marker.unlink()

    release = tmp_path / "release"
    release.mkdir()
    (release / "finetuned.safetensors").write_bytes(pickle.dumps({"state_dict": Payload()}))
    (tmp_path / "finetuned.pt").write_bytes(pickle.dumps(Payload()))
    flipped = bytearray((root / "models/release/finetuned.safetensors").read_bytes())
    flipped[-1] ^= 0x01
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    for model, says in ((str(release), str(release / "finetuned.safetensors") + ": not a safetensors model file"),
                        (str(tmp_path / "finetuned.pt"), "never loaded"),
                        (str(tmp_path / "flipped.safetensors"), "does not match the checksum")):
        out = _predict(tmp_path, image, "--model", model)
        assert out.returncode == 2 and says in out.stderr, out.stderr
        assert out.stdout == "" and "Traceback" not in out.stderr
    assert not marker.exists()


def test_markdown_card_beside_the_json(tiny_run):
    root, _, _ = tiny_run
    release = root / "models" / "release"
    card = json.loads((release / "model_card.json").read_text())
    text = (release / "model_card.md").read_text()
    metrics = card["metrics"]
    for fact in (card["data_version"], card["corpus_version"], card["data_source"], card["corpus_source"],
                 f"{metrics['test']['accuracy']:.4f}", f"{metrics['scratch']['test']['accuracy']:.4f}",
                 f"Transfer gain: {metrics['transfer_gain']:+.4f}", "finetuned.safetensors",
                 "image_size `8`", "10 classes", "| `7` |", "reports/usage/evaluate.json", "Not decided yet"):
        assert fact in text, fact
    if card.get("curves"):  # the training curves, when the run recorded them: embedded, the image beside the card
        assert f"![curves]({card['curves']})" in text and (release / card["curves"]).is_file()
    else:
        assert "![curves]" not in text
