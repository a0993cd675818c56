"""Dataset sources: builtin digits, ImageFolder validation (every problem named), splits, data version."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.sources import load_source
from pipeline.data.tasks import SPLITS, select
from pipeline.errors import DataError
from pipeline.stages.prepare import data_version, stratified_split
from tests.conftest import make_image_folder, write_png


def test_builtin_digits_is_the_real_sklearn_set():
    raw = load_source("builtin:digits")
    assert raw.images.shape == (1797, 8, 8, 1)
    assert raw.images.dtype == np.uint8 and raw.images.max() == 255
    assert raw.class_names == [str(d) for d in range(10)]
    assert len(set(raw.hashes)) > 1700 and len(raw.files) == 1797


def test_unknown_builtin_names_data_source():
    with pytest.raises(DataError, match="data.source.*builtin:nope"):
        load_source("builtin:nope")


def test_image_folder_loads(tmp_path: Path):
    root = make_image_folder(tmp_path / "digits", classes=3, per_class=4)
    raw = load_source(str(root))
    assert raw.class_names == ["digit0", "digit1", "digit2"]
    assert raw.images.shape == (12, 8, 8, 1)
    assert np.bincount(raw.labels).tolist() == [4, 4, 4]
    assert raw.files[0] == f"{root}/digit0/000.png"
    assert len(raw.hashes[0]) == 64


def test_rgb_and_jpg_images_load(tmp_path: Path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        for i in range(3):
            write_png(tmp_path / cls / f"{i}.png", rng.integers(0, 255, (6, 5, 3), dtype=np.uint8))
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).save(tmp_path / "dog" / "x.JPG")
    raw = load_source(str(tmp_path))
    assert raw.images.shape == (7, 6, 5, 3)


def _problems(source: Path) -> str:
    with pytest.raises(DataError) as err:
        load_source(str(source))
    return err.value.render()


def test_missing_folder_named(tmp_path: Path):
    assert f"{tmp_path / 'nowhere'}" in _problems(tmp_path / "nowhere")


def test_file_instead_of_folder_named(tmp_path: Path):
    (tmp_path / "file.png").write_bytes(b"x")
    assert "file.png" in _problems(tmp_path / "file.png")


def test_no_class_folders(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "no class folders" in _problems(tmp_path)


def test_corrupt_image_named(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3)
    (root / "digit1" / "001.png").write_bytes(b"\x89PNG not really an image")
    text = _problems(root)
    assert f"{root}/digit1/001.png: unreadable or corrupt image" in text


def test_truncated_image_named(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3)
    target = root / "digit0" / "002.png"
    target.write_bytes(target.read_bytes()[:40])
    assert f"{root}/digit0/002.png" in _problems(root)


def test_empty_class_named(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3)
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    assert f"{root}/empty: empty class folder" in _problems(root)


def test_mixed_sizes_and_channels_named(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3)
    write_png(root / "digit0" / "big.png", np.zeros((16, 16), dtype=np.uint8))
    write_png(root / "digit1" / "rgb.png", np.zeros((8, 8, 3), dtype=np.uint8))
    text = _problems(root)
    assert f"{root}/digit0/big.png: image is 16x16 with 1 channel(s)" in text
    assert f"{root}/digit1/rgb.png: image is 8x8 with 3 channel(s)" in text


def test_loose_images_at_root_named(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3)
    write_png(root / "stray.png", np.zeros((8, 8), dtype=np.uint8))
    text = _problems(root)
    assert "images found directly in the folder (stray.png" in text


def test_sixteen_bit_images_rejected(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3)
    write_png(root / "digit0" / "deep.png", np.zeros((8, 8), dtype=np.uint16))
    assert f"{root}/digit0/deep.png: unsupported pixel type" in _problems(root)


def test_every_problem_reported_in_one_run(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", classes=3, per_class=3)
    (root / "digit0" / "000.png").write_bytes(b"garbage")
    (root / "digit2" / "001.png").write_bytes(b"more garbage")
    (root / "hollow").mkdir()
    write_png(root / "digit1" / "wide.png", np.zeros((8, 12), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        load_source(str(root))
    problems = err.value.problems
    assert len(problems) == 4
    for name in ("digit0/000.png", "digit2/001.png", "hollow", "digit1/wide.png"):
        assert any(name in p for p in problems), name


# ---------------------------------------------------------------- splits and versions


def test_stratified_split_is_seeded_and_stratified():
    labels = np.repeat(np.arange(4), 40)
    first = stratified_split(labels, 0.15, 0.25, seed=1)
    assert np.array_equal(first, stratified_split(labels, 0.15, 0.25, seed=1))
    assert not np.array_equal(first, stratified_split(labels, 0.15, 0.25, seed=2))
    for label in range(4):
        counts = np.bincount(first[labels == label], minlength=3)
        assert counts[SPLITS["test"]] == 10 and counts[SPLITS["val"]] == 6 and counts[SPLITS["train"]] == 24


def test_label_budget_sampling():
    labels = np.repeat(np.arange(3), 10)
    images = np.zeros((30, 4, 4, 1), dtype=np.uint8)
    split = np.zeros(30, dtype=np.int8)
    task = select(images, labels, split, ["a", "b", "c"], "train", per_class=2, seed=0)
    assert task.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert task.images.shape == (6, 1, 4, 4)
    assert float(task.images.min()) == -1.0  # scaled to [-1, 1]
    again = select(images, labels, split, ["a", "b", "c"], "train", per_class=2, seed=0)
    assert task.labels.tolist() == again.labels.tolist()


def test_data_version_depends_on_content_not_location(tmp_path: Path):
    root = make_image_folder(tmp_path / "a", classes=2, per_class=3)
    moved = tmp_path / "elsewhere" / "b"
    shutil.copytree(root, moved)
    version = data_version(load_source(str(root)))
    assert version.startswith("data-")
    assert data_version(load_source(str(moved))) == version
    write_png(moved / "digit1" / "extra.png", np.full((8, 8), 7, dtype=np.uint8))
    assert data_version(load_source(str(moved))) != version
