"""Dataset sources: listing, hashing and validation (every problem named), splits, content ids. No decoding."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.shards import UNLABELLED
from pipeline.data.sources import content_id, scan_source
from pipeline.data.splits import SPLITS
from pipeline.errors import DataError
from pipeline.stages.prepare import data_version, stratified_split
from tests.conftest import make_image_folder, tiny_config, write_photo, write_png


@pytest.fixture
def cfg(tmp_path: Path):
    return tiny_config(tmp_path / "run")


def test_builtin_digits_is_the_real_sklearn_set(cfg):
    scan = scan_source("builtin:digits", "data", cfg)
    assert len(scan.items) == 1797 and scan.problems == []
    assert scan.classes == [str(d) for d in range(10)]
    first = scan.items[0].origin
    assert first.shape == (8, 8, 1) and first.dtype == np.uint8
    assert max(int(item.origin.max()) for item in scan.items) == 255
    assert len({item.sha256 for item in scan.items}) > 1700
    assert scan.items[5].path == "builtin:digits/5" and scan.files == []


def test_builtin_digits_content_id_unchanged(cfg):
    # The id the pre-shard pipeline gave the digits (sha256 of each 8x8x1 array's bytes, with its class):
    # existing runs, registries and pins keep matching.
    assert content_id("builtin:digits", "data", cfg) == "data-06042341fe50ad92"


def test_builtins_belong_to_their_stage(cfg):
    with pytest.raises(DataError, match="data.source.*builtin:nope"):
        scan_source("builtin:nope", "data", cfg)
    with pytest.raises(DataError, match="data.source.*builtin:glyphs.*known: builtin:digits"):
        scan_source("builtin:glyphs", "data", cfg)
    with pytest.raises(DataError, match="pretrain.source.*builtin:digits.*known: builtin:glyphs"):
        scan_source("builtin:digits", "corpus", cfg)


def test_builtin_glyphs_are_listed_without_rendering(tmp_path: Path):
    cfg = tiny_config(tmp_path, "pretrain.glyphs_per_class=12")
    scan = scan_source("builtin:glyphs", "corpus", cfg)
    assert len(scan.items) == 120 and scan.classes == list("0123456789") and scan.labelled
    assert [item.label for item in scan.items[:11]] == [*range(10), 0]
    again = scan_source("builtin:glyphs", "corpus", cfg)
    assert scan.content_id() == again.content_id() and scan.content_id().startswith("corpus-")
    bigger = scan_source("builtin:glyphs", "corpus", tiny_config(tmp_path, "pretrain.glyphs_per_class=12",
                                                                 "data.image_size=16"))
    assert bigger.content_id() != scan.content_id()  # other pixels, other id
    reseeded = scan_source("builtin:glyphs", "corpus", tiny_config(tmp_path, "pretrain.glyphs_per_class=12", "seed=7"))
    assert reseeded.content_id() != scan.content_id()


def test_image_folder_listing(tmp_path: Path, cfg):
    root = make_image_folder(tmp_path / "digits", classes=3, per_class=4)
    write_png(root / "digit1" / "nested" / "deep.png", np.zeros((8, 8), dtype=np.uint8))
    (root / "digit0" / "notes.txt").write_text("not an image")
    write_png(root / "digit0" / "._000.png", np.zeros((8, 8), dtype=np.uint8))  # macOS fork: hidden
    write_png(root / ".ipynb_checkpoints" / "x.png", np.zeros((8, 8), dtype=np.uint8))
    scan = scan_source(str(root), "data", cfg)
    assert scan.problems == [] and scan.classes == ["digit0", "digit1", "digit2"]
    assert [item.label for item in scan.items] == [0] * 4 + [1] * 5 + [2] * 4
    assert scan.items[0].path == f"{root}/digit0/000.png"
    assert f"{root}/digit1/nested/deep.png" in scan.files
    png = root / "digit2" / "003.png"
    item = next(i for i in scan.items if i.path == str(png))
    assert item.sha256 == hashlib.sha256(png.read_bytes()).hexdigest()
    assert (item.width, item.height, item.mode) == (8, 8, "L")
    assert item.origin == str(png)  # a local file is read where it is


def test_image_folder_content_id_is_the_old_data_version(tmp_path: Path, cfg):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3)
    write_photo(root / "digit1" / "photo.JPG", size=(30, 20))
    # The pre-shard algorithm: sorted "<sha256 of the file> <class>" lines.
    lines = sorted(f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.parent.name}\n"
                   for p in root.rglob("*") if p.is_file())
    expected = "data-" + hashlib.sha256("".join(lines).encode()).hexdigest()[:16]
    assert content_id(str(root), "data", cfg) == expected
    assert data_version(scan_source(str(root), "data", cfg)) == expected


def test_content_id_depends_on_content_not_location(tmp_path: Path, cfg):
    root = make_image_folder(tmp_path / "a", classes=2, per_class=3)
    moved = tmp_path / "elsewhere" / "b"
    shutil.copytree(root, moved)
    version = content_id(str(root), "data", cfg)
    assert version.startswith("data-") and content_id(str(moved), "data", cfg) == version
    write_png(moved / "digit1" / "extra.png", np.full((8, 8), 7, dtype=np.uint8))
    assert content_id(str(moved), "data", cfg) != version
    shutil.move(moved / "digit1" / "extra.png", moved / "digit0" / "extra.png")
    assert content_id(str(moved), "data", cfg) != version  # same bytes, other class


def test_unlabelled_corpus_is_every_image_under_the_folder(tmp_path: Path, cfg):
    root = tmp_path / "photos"
    write_photo(root / "a.jpg")
    write_photo(root / "2023" / "b.png", seed=1)
    write_photo(root / "2023" / "06" / "c.webp", seed=2)
    (root / "index.html").write_text("<html/>")
    scan = scan_source(str(root), "corpus", cfg)
    assert scan.problems == [] and scan.classes == [] and not scan.labelled
    assert [item.path for item in scan.items] == [f"{root}/2023/06/c.webp", f"{root}/2023/b.png", f"{root}/a.jpg"]
    assert {item.label for item in scan.items} == {UNLABELLED}
    assert scan.content_id().startswith("corpus-") and content_id(str(root), "corpus", cfg) == scan.content_id()


def test_image_folder_corpus_is_labelled(tmp_path: Path, cfg):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=2)
    scan = scan_source(str(root), "corpus", cfg)
    assert scan.problems == [] and scan.classes == ["digit0", "digit1"]  # 2 per class is enough for train/val


def _problems(source: Path, cfg, kind="data") -> list[str]:
    try:
        scan = scan_source(str(source), kind, cfg)
    except DataError as exc:
        return exc.problems
    assert scan.problems, "expected problems"
    with pytest.raises(DataError):
        content_id(str(source), kind, cfg)
    return scan.problems


def test_missing_folder_named(tmp_path: Path, cfg):
    assert any(f"{tmp_path / 'nowhere'}" in p for p in _problems(tmp_path / "nowhere", cfg))


def test_file_instead_of_folder_named(tmp_path: Path, cfg):
    (tmp_path / "file.png").write_bytes(b"x")
    assert any("file.png" in p for p in _problems(tmp_path / "file.png", cfg))


def test_no_class_folders(tmp_path: Path, cfg):
    (tmp_path / "notes.txt").write_text("hello")
    assert any("no class folders" in p for p in _problems(tmp_path, cfg))


def test_corpus_without_images(tmp_path: Path, cfg):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    problems = _problems(tmp_path, cfg, kind="corpus")
    assert any("broken.jpg: not an image" in p for p in problems)
    assert any(f"{tmp_path}: 0 readable image(s)" in p for p in problems)


def test_every_problem_reported_in_one_scan(tmp_path: Path, cfg):
    root = make_image_folder(tmp_path / "d", classes=4, per_class=3)
    (root / "digit0" / "000.png").write_bytes(b"garbage")
    (root / "digit2" / "001.png").write_text("a text file named .png")
    write_png(root / "digit1" / "tiny.png", np.zeros((4, 12), dtype=np.uint8))
    (root / "hollow").mkdir()
    (root / "hollow" / "readme.txt").write_text("no images here")
    write_png(root / "stray.png", np.zeros((8, 8), dtype=np.uint8))
    for extra in sorted((root / "digit3").iterdir())[2:]:
        extra.unlink()
    problems = _problems(root, cfg)
    expected = {
        "digit0/000.png": "not an image",
        "digit2/001.png": "not an image",
        "digit1/tiny.png": "12x4 px, shorter side below data.min_image_size=8",
        "hollow": "empty class folder",
        "stray.png": "images found directly in the folder",
        "digit3": "2 image(s); need at least 3",
        "digit0": "2 image(s)",  # one of its 3 is unreadable
        "digit2": "2 image(s)",
    }
    for name, what in expected.items():
        assert any(name in p and what in p for p in problems), (name, problems)
    assert len(problems) == len(expected)


def test_min_image_size_is_configurable(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3)
    write_png(root / "digit0" / "big.png", np.zeros((9, 9), dtype=np.uint8))  # one usable image: lines per file
    problems = _problems(root, tiny_config(tmp_path, "data.min_image_size=9"))
    small = [p for p in problems if "shorter side below data.min_image_size=9" in p]
    assert len(small) == 6 and all("8x8 px" in p for p in small)


def test_all_images_below_min_image_size_is_one_message_naming_the_setting(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3)
    problems = _problems(root, tiny_config(tmp_path, "data.min_image_size=9"))
    assert problems == [f"{root}: all 6 image(s) have a shorter side below data.min_image_size=9 px (the largest "
                        "is 8 px); lower data.min_image_size to 8 if that resolution is what you want to train on, "
                        "or use larger images"]


# ---------------------------------------------------------------- splits


def test_stratified_split_is_seeded_and_stratified():
    labels = np.repeat(np.arange(4), 40)
    first = stratified_split(labels, 0.15, 0.25, seed=1)
    assert np.array_equal(first, stratified_split(labels, 0.15, 0.25, seed=1))
    assert not np.array_equal(first, stratified_split(labels, 0.15, 0.25, seed=2))
    for label in range(4):
        counts = np.bincount(first[labels == label], minlength=3)
        assert counts[SPLITS["test"]] == 10 and counts[SPLITS["val"]] == 6 and counts[SPLITS["train"]] == 24



def test_an_unchanged_local_file_is_not_read_again_and_a_changed_one_is(tmp_path: Path, cfg, monkeypatch):
    from pipeline.data import object_cache

    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "digits", classes=3, per_class=4)
    reads = []
    real_read = object_cache.read_origin
    monkeypatch.setattr(object_cache, "read_origin", lambda origin, shown: reads.append(shown) or real_read(origin, shown))
    first = scan_source(str(root), "data", cfg)
    assert len(reads) == 12 and (tmp_path / "cache" / "file-hashes.sqlite").is_file()
    reads.clear()
    again = scan_source(str(root), "data", cfg)
    assert reads == [] and again.content_id() == first.content_id()
    assert [(i.path, i.sha256, i.width, i.height, i.mode, i.origin) for i in again.items] == \
        [(i.path, i.sha256, i.width, i.height, i.mode, i.origin) for i in first.items]
    changed = root / "digit1" / "002.png"
    write_png(changed, np.full((8, 8), 200, dtype=np.uint8))  # new bytes: a new mtime
    third = scan_source(str(root), "data", cfg)
    assert reads == [str(changed)]
    assert next(i for i in third.items if i.path == str(changed)).sha256 == hashlib.sha256(changed.read_bytes()).hexdigest()
    assert third.content_id() != first.content_id()


def test_with_the_caches_off_every_file_is_read(tmp_path: Path, cfg, monkeypatch):
    from pipeline.data import object_cache

    monkeypatch.setenv("PIPELINE_CACHE_DIR", "off")
    root = make_image_folder(tmp_path / "digits", classes=3, per_class=2)
    reads = []
    real_read = object_cache.read_origin
    monkeypatch.setattr(object_cache, "read_origin", lambda origin, shown: reads.append(shown) or real_read(origin, shown))
    scan_source(str(root), "data", cfg)
    scan_source(str(root), "data", cfg)
    assert len(reads) == 12
