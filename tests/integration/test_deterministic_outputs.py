"""Every stage's DVC outputs are a pure function of code, params and data, and own data
keeps its size.

Each stage is computed twice, independently (two `paths.root`, separate decoded-image caches: one cold,
one warm), and every file of every DVC output (dvc.yaml `outs`, `metrics`, `plots`) is compared byte for
byte. Timings, reused-work counts, hosts and dates live in the run reports (reports/usage/), which no
stage lists.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.errors import DataError
from pipeline.stages import STAGES, stage_runner
from tests.conftest import REPO_ROOT, make_image_folder, run_stages, tiny_config, write_png


def _dvc_outputs() -> dict[str, list[str]]:
    """stage -> its outputs' paths, as dvc.yaml lists them."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        paths = []
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key) or []:
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
        out[name] = paths
    return out


def _files(root: Path, outputs: list[str]) -> dict[str, bytes]:
    files = {}
    for output in outputs:
        target = root / output
        found = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        assert found, f"{output}: missing under {root}"
        files.update({p.relative_to(root).as_posix(): p.read_bytes() for p in found})
    return files


def _assert_identical(first: Path, second: Path, outputs: list[str]) -> None:
    a, b = _files(first, outputs), _files(second, outputs)
    assert sorted(a) == sorted(b), f"different files: {sorted(set(a) ^ set(b))}"
    differing = [name for name in a if a[name] != b[name]]
    assert not differing, f"not byte-identical when recomputed: {differing}"


@pytest.mark.parametrize("source", ["builtin", "folder"])
def test_each_stage_recomputed_gives_byte_identical_outputs(tmp_path, monkeypatch, source):
    extra = ["trainer.deterministic=true", "trainer.accelerator=cpu"]
    if source == "folder":  # decodes files: the first run fills a decode cache the second finds warm
        folder = make_image_folder(tmp_path / "digits", classes=3, per_class=12)
        extra += [f"data.source={folder}", f"pretrain.source={folder}", "finetune.labels_per_class=3"]
    outputs = _dvc_outputs()
    roots = [tmp_path / "first", tmp_path / "second"]
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))  # shared: cold, then warm
    results = [run_stages(tiny_config(root, *extra)) for root in roots]
    if source == "folder":
        assert results[0]["prepare"]["decoded"] == 36 and results[1]["prepare"]["reused"] == 36
    for stage in STAGES:
        _assert_identical(*roots, outputs[stage])
    # What differs between the runs is in their reports, none of which is an output.
    for root, result in zip(roots, results):
        for stage in STAGES:
            report = json.loads((root / "reports" / "usage" / f"{stage}.json").read_text())
            assert report["stage"] == stage and "finished_at" in report and "host" in report
        assert "wall_time_s" in result["prepare"] and "wall_time_s" in result["pretrain"]


def test_outputs_hold_no_timings_or_run_facts(tiny_run):
    root, _, _ = tiny_run
    moved = {"wall_time_s", "device_hours", "images_per_s", "decoded", "reused", "step_time", "resumed_from_step",
             "created_at", "hardware", "git_commit", "checkpoints", "host", "finished_at"}

    def keys(value):
        if isinstance(value, dict):
            for key, inner in value.items():
                yield key
                yield from keys(inner)
        elif isinstance(value, list):
            for inner in value:
                yield from keys(inner)

    for stage, outputs in _dvc_outputs().items():
        for name, data in _files(root, outputs).items():
            if name.endswith(".json"):
                found = moved & set(keys(json.loads(data)))
                assert not found, f"{name} holds {found}"
            assert b"images_per_s" not in data, name
    card = json.loads((root / "models/release/model_card.json").read_text())
    assert "paths" not in card["params"]
    # The run report has them, and the card merged with it shows them (what the registry keeps).
    report = json.loads((root / "reports/usage/evaluate.json").read_text())
    assert set(report["wall_time_s"]) == set(STAGES) and report["hardware"]["torch"] and report["created_at"]
    assert set(report["device_hours"]["stages"]) == set(STAGES)


def test_a_training_stage_run_twice_gives_the_same_bytes(tiny_run, tmp_path):
    """pretrain and finetune again from the same inputs (a copy of the first run's), fresh checkpoints."""
    import shutil

    root, _, _ = tiny_run
    for output in ("data/prepared", "data/corpus"):
        shutil.copytree(root / output, tmp_path / output)
    run_stages(tiny_config(tmp_path, "trainer.deterministic=true"), "pretrain", "finetune")
    outputs = _dvc_outputs()
    for stage in ("pretrain", "finetune"):
        _assert_identical(root, tmp_path, outputs[stage])


# ---------------------------------------------------------------- own data: its size


def _uniform_folder(root: Path, side: int, classes: int = 3, per_class: int = 12) -> Path:
    """Real digits upscaled to side x side: one size for every image."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(classes):
        for i, index in enumerate(np.flatnonzero(digits.target == label)[:per_class]):
            pixels = np.round(digits.images[index] * (255 / 16)).astype(np.uint8)
            write_png(root / f"digit{label}" / f"{i:03d}.png",
                      np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC)))
    return root


def test_auto_gives_a_uniform_folder_its_native_size_and_the_corpus_follows(tmp_path):
    folder = _uniform_folder(tmp_path / "own", side=24)
    cfg = tiny_config(tmp_path / "run", f"data.source={folder}")
    assert cfg.data.image_size == "auto"
    summary = stage_runner("prepare")(cfg)
    manifest = json.loads((tmp_path / "run/data/prepared/manifest.json").read_text())
    assert summary["image_size"] == 24 and manifest["image_shape"] == [24, 24, 1]
    stage_runner("corpus")(cfg)  # builtin glyphs, rendered at the target's size
    assert json.loads((tmp_path / "run/data/corpus/manifest.json").read_text())["image_shape"] == [24, 24, 1]
    explicit = stage_runner("prepare")(tiny_config(tmp_path / "explicit", f"data.source={folder}", "data.image_size=24"))
    assert explicit["data_version"] == summary["data_version"]
    assert (tmp_path / "run/data/prepared/shards").is_dir()
    first = {p.name: p.read_bytes() for p in (tmp_path / "run/data/prepared/shards").iterdir()}
    second = {p.name: p.read_bytes() for p in (tmp_path / "explicit/data/prepared/shards").iterdir()}
    assert first == second  # auto == its size set explicitly


def test_the_digits_demo_stays_at_8_px(tiny_run):
    root, cfg, results = tiny_run
    assert cfg.data.image_size == "auto" and results["prepare"]["image_size"] == 8
    assert json.loads((root / "data/corpus/manifest.json").read_text())["image_shape"] == [8, 8, 1]


def test_mixed_sizes_with_auto_ask_for_data_image_size_and_write_nothing(tmp_path, cli):
    folder = _uniform_folder(tmp_path / "own", side=16)
    _uniform_folder(tmp_path / "other", side=20, classes=1, per_class=2)
    for path in (tmp_path / "other" / "digit0").iterdir():
        path.rename(folder / "digit0" / f"big-{path.name}")
    root = tmp_path / "run"
    for stage in ("prepare", "corpus"):
        code, _, err = cli(stage, "--set", f"data.source={folder}", "--set", f"paths.root={root}")
        assert code == 2, err
        assert "data.image_size is auto, but the images have 2 different shorter sides (16 px x36, 20 px x2)" in err
        assert "set data.image_size" in err and "1 data problem(s)" in err and "Traceback" not in err
    assert not (root / "data").exists()
    code, _, err = cli("prepare", "--set", f"data.source={folder}", "--set", "data.image_size=16",
                       "--set", f"paths.root={root}")
    assert code == 0, err


def test_an_explicit_size_larger_than_every_image_is_exit_2_naming_the_setting(tmp_path, cli):
    folder = _uniform_folder(tmp_path / "own", side=16)
    root = tmp_path / "run"
    code, _, err = cli("prepare", "--set", f"data.source={folder}", "--set", "data.image_size=32",
                       "--set", f"paths.root={root}")
    assert code == 2 and "1 data problem(s)" in err, err
    assert "data.image_size=32 is larger than every image in it (the largest shorter side is 16 px)" in err
    # The corpus: a folder of images all smaller than the target's side.
    big = _uniform_folder(tmp_path / "big", side=32)
    code, _, err = cli("corpus", "--set", f"data.source={big}", "--set", f"pretrain.source={folder}",
                       "--set", f"paths.root={root}")
    assert code == 2 and "every image of pretrain.source is smaller than the side the corpus shares" in err, err
    assert "data.image_size: 32 px" in err
    assert not (root / "data").exists()


def test_all_images_below_min_image_size_is_exit_2_with_one_message(tmp_path, cli):
    folder = make_image_folder(tmp_path / "digits", classes=2, per_class=3)  # 8 px
    root = tmp_path / "run"
    code, _, err = cli("prepare", "--set", f"data.source={folder}", "--set", "data.min_image_size=12",
                       "--set", f"paths.root={root}")
    assert code == 2 and "1 data problem(s)" in err, err
    assert "all 6 image(s) have a shorter side below data.min_image_size=12 px" in err
    assert not (root / "data").exists()
    with pytest.raises(DataError, match="data.min_image_size=12"):
        stage_runner("corpus")(tiny_config(root, f"data.source={folder}", "data.min_image_size=12"))
