"""`prepare` and `corpus` on real image files: any photo folder in, decoded shards + manifest out."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.shards import UNLABELLED, read_shard
from pipeline.data.sources import content_id
from pipeline.errors import DataError
from pipeline.stages import corpus, prepare
from tests.conftest import make_image_folder, read_json, tiny_config, write_photo

pytest_plugins = ["tests.s3_fixtures"]


@pytest.fixture(autouse=True)
def decoded_cache(tmp_path: Path, monkeypatch) -> Path:
    """Each test its own cache: counts of decoded vs reused images are exact, ~/.cache untouched."""
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"



def _samples(out: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every sample of one split, in stored order, through the shard reader training uses."""
    manifest = read_json(out / "manifest.json")
    parts = [read_shard(str(out / e["name"]), e["samples"]) for e in manifest["shards"][split]]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [k for p in parts for k in p[2]])


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


def _mixed_folder(root: Path) -> Path:
    """Three classes of photos of every size and mode, five each."""
    modes = [("RGB", ".jpg"), ("L", ".png"), ("RGBA", ".png"), ("P", ".gif"), ("RGB", ".webp")]
    for c, cls in enumerate(("cat", "dog", "owl")):
        for i, (mode, suffix) in enumerate(modes):
            write_photo(root / cls / f"{i}{suffix}", size=(20 + 7 * i + c, 30 + 5 * i), mode=mode, seed=10 * c + i)
    return root


def test_builtin_digits_unchanged(tmp_path: Path):
    summary = prepare.run(tiny_config(tmp_path))
    out = tmp_path / "data" / "prepared"
    manifest = read_json(out / "manifest.json")
    assert summary["images"] == 1797 and manifest["image_shape"] == [8, 8, 1]
    assert manifest["data_version"] == summary["data_version"] == "data-06042341fe50ad92"  # as before shards
    assert sorted(p.name for p in out.iterdir()) == ["_COMPLETE", "manifest.json", "shards", "summary.json"]
    from sklearn.datasets import load_digits

    digits = load_digits()
    expected = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    by_key = {f["key"]: i for i, f in enumerate(manifest["files"])}
    for split in ("train", "val", "test"):
        images, labels, keys = _samples(out, split)
        index = [by_key[k] for k in keys]
        assert np.array_equal(images, expected[index])  # byte-identical pixels: identity transform
        assert np.array_equal(labels, digits.target[index])
        assert all(manifest["files"][i]["split"] == split for i in index)
        assert len(keys) == manifest["split_counts"][split]


def test_mixed_sizes_and_modes(tmp_path: Path, capsys):
    source = _mixed_folder(tmp_path / "photos")
    summary = prepare.run(tiny_config(tmp_path / "run", f"data.source={source}", "data.image_size=16",
                                      "data.channels=3"))
    out = tmp_path / "run" / "data" / "prepared"
    manifest = read_json(out / "manifest.json")
    assert manifest["classes"] == ["cat", "dog", "owl"] and manifest["image_shape"] == [16, 16, 3]
    assert manifest["transform"] == {"image_size": 16, "channels": 3, "resize": "shorter side, centre crop",
                                     "exif_transpose": True}
    assert manifest["source_stats"]["modes"] == {"RGB": 6, "L": 3, "RGBA": 3, "P": 3}
    assert sum(manifest["source_stats"]["sizes"].values()) == 15
    assert [f["key"] for f in manifest["files"]] == [f"{i:08d}" for i in range(15)]
    assert manifest["files"][0]["path"] == f"{source}/cat/0.jpg"
    classes = {f["key"]: f["class"] for f in manifest["files"]}
    total = 0
    for split in ("train", "val", "test"):
        images, labels, keys = _samples(out, split)
        assert images.shape[1:] == (16, 16, 3) and images.dtype == np.uint8
        assert [manifest["classes"][label] for label in labels] == [classes[k] for k in keys]
        total += len(keys)
    assert total == summary["images"] == 15 and summary["decoded"] == 15 and summary["reused"] == 0
    assert summary["shards"] == 3 and summary["classes"] == 3
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[prepare] 15 images, 3 classes, 16 px, splits {") and manifest["data_version"] in last
    assert manifest["data_version"] == content_id(str(source), "data", tiny_config(tmp_path / "run"))


def test_every_problem_in_one_error_and_nothing_published(tmp_path: Path):
    source = make_image_folder(tmp_path / "images", classes=3, per_class=4)
    jpeg = write_photo(source / "digit0" / "cut.jpg", size=(64, 48))
    jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])  # header fine, pixels missing
    (source / "digit1" / "notes.png").write_text("a text file, not a png")
    write_photo(source / "digit1" / "tiny.png", size=(5, 5))
    write_photo(source / "pair" / "a.png", seed=1)
    write_photo(source / "pair" / "b.png", seed=2)
    with pytest.raises(DataError) as err:
        prepare.run(tiny_config(tmp_path / "run", f"data.source={source}", "data.image_size=8"))
    problems = err.value.problems
    for name, what in [("digit0/cut.jpg", "unreadable or corrupt"), ("digit1/notes.png", "not an image"),
                       ("digit1/tiny.png", "5x5 px"), ("pair", "2 image(s); need at least 3")]:
        assert any(f"{source}/{name}" in p and what in p for p in problems), (name, problems)
    assert len(problems) == 4
    assert not (tmp_path / "run" / "data" / "prepared").exists()



def test_bad_data_never_replaces_the_previous_output(tmp_path: Path):
    source = make_image_folder(tmp_path / "images", classes=3, per_class=10)
    cfg = tiny_config(tmp_path / "run", f"data.source={source}", "data.image_size=8")
    prepare.run(cfg)
    prepared = tmp_path / "run" / "data" / "prepared"
    before = {p: p.read_bytes() for p in sorted(prepared.rglob("*")) if p.is_file()}
    jpeg = write_photo(source / "digit1" / "cut.jpg", size=(64, 48))
    jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])  # found only when decoding, mid-shards
    with pytest.raises(DataError, match="digit1/cut.jpg"):
        prepare.run(cfg)
    assert {p: p.read_bytes() for p in sorted(prepared.rglob("*")) if p.is_file()} == before
    assert [p.name for p in prepared.parent.iterdir()] == ["prepared"]  # no staging folder left behind

def test_truncated_file_alone_fails_after_decoding(tmp_path: Path):
    source = make_image_folder(tmp_path / "images", classes=2, per_class=4)
    jpeg = write_photo(source / "digit1" / "cut.jpg", size=(64, 48))
    jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])
    with pytest.raises(DataError) as err:
        prepare.run(tiny_config(tmp_path / "run", f"data.source={source}", "data.image_size=8"))
    assert len(err.value.problems) == 1 and f"{source}/digit1/cut.jpg" in err.value.problems[0]
    assert not (tmp_path / "run" / "data" / "prepared").exists()


def test_second_run_reuses_every_decoded_image(tmp_path: Path):
    source = _mixed_folder(tmp_path / "photos")
    overrides = [f"data.source={source}", "data.image_size=12", "data.channels=3"]
    first = prepare.run(tiny_config(tmp_path / "a", *overrides))
    second = prepare.run(tiny_config(tmp_path / "b", *overrides))
    assert (first["decoded"], first["reused"]) == (15, 0)
    assert (second["decoded"], second["reused"]) == (0, 15)
    a, b = tmp_path / "a/data/prepared", tmp_path / "b/data/prepared"
    assert _shard_bytes(a) == _shard_bytes(b)
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    write_photo(source / "dog" / "new.png", size=(33, 33), seed=99)
    third = prepare.run(tiny_config(tmp_path / "c", *overrides))
    assert (third["decoded"], third["reused"]) == (1, 15)  # only the new file
    other_size = prepare.run(tiny_config(tmp_path / "d", f"data.source={source}", "data.image_size=10"))
    assert other_size["reused"] == 0  # another transform, other pixels


def test_cache_off_and_unwritable_cache_cost_only_speed(tmp_path: Path, monkeypatch):
    source = _mixed_folder(tmp_path / "photos")
    overrides = [f"data.source={source}", "data.image_size=12"]
    reference = prepare.run(tiny_config(tmp_path / "a", *overrides))
    monkeypatch.setenv("PIPELINE_CACHE_DIR", "off")
    for run in ("b", "c"):
        assert prepare.run(tiny_config(tmp_path / run, *overrides))["reused"] == 0
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(blocker))
    assert prepare.run(tiny_config(tmp_path / "d", *overrides))["reused"] == 0
    for run in "bcd":
        assert _shard_bytes(tmp_path / run / "data/prepared") == _shard_bytes(tmp_path / "a/data/prepared")
    assert reference["decoded"] == 15


def test_worker_count_does_not_change_the_output(tmp_path: Path, decoded_cache: Path, monkeypatch):
    source = _mixed_folder(tmp_path / "photos")
    outputs = []
    for workers in (1, 2):
        monkeypatch.setenv("PIPELINE_CACHE_DIR", str(decoded_cache / str(workers)))  # both really decode
        root = tmp_path / f"w{workers}"
        summary = prepare.run(tiny_config(root, f"data.source={source}", "data.image_size=12", "data.channels=1",
                                          f"data.num_workers={workers}"))
        assert summary["workers"] == workers and summary["decoded"] == 15
        outputs.append(root / "data" / "prepared")
    assert _shard_bytes(outputs[0]) == _shard_bytes(outputs[1])
    assert (outputs[0] / "manifest.json").read_bytes() == (outputs[1] / "manifest.json").read_bytes()


def test_shards_mix_classes_in_a_seeded_order(tmp_path: Path):
    source = make_image_folder(tmp_path / "images", classes=3, per_class=40)
    overrides = [f"data.source={source}", "data.shard_mb=1"]
    prepare.run(tiny_config(tmp_path / "a", *overrides))
    prepare.run(tiny_config(tmp_path / "b", *overrides, "seed=5"))
    _, labels, keys = _samples(tmp_path / "a/data/prepared", "train")
    assert sorted(labels.tolist()) != labels.tolist()  # not class after class
    assert set(labels[:20].tolist()) == {0, 1, 2}
    assert keys != sorted(keys)
    assert _samples(tmp_path / "b/data/prepared", "train")[2] != keys


def test_large_photos_at_a_small_size_warn(tmp_path: Path, capsys):
    source = tmp_path / "photos"
    for cls in ("a", "b"):
        for i in range(6):
            write_photo(source / cls / f"{i}.jpg", size=(64, 48), seed=i)
    # data.image_size auto: their own size, no downscale, no warning.
    assert prepare.run(tiny_config(tmp_path / "run", f"data.source={source}"))["image_size"] == 48
    assert "warning" not in capsys.readouterr().out
    prepare.run(tiny_config(tmp_path / "run", f"data.source={source}", "data.image_size=8"))
    assert ("images are ~48 px, resized down to 8 px (data.image_size); photos want e.g. "
            "--set data.image_size=224 --set data.channels=3") in capsys.readouterr().out
    prepare.run(tiny_config(tmp_path / "run", f"data.source={source}", "data.image_size=16"))
    assert "warning" not in capsys.readouterr().out


def test_version_pin_mismatch_refused(tmp_path: Path):
    source = make_image_folder(tmp_path / "images", classes=3, per_class=5)
    with pytest.raises(DataError, match="data.version pins data-0000000000000000"):
        prepare.run(tiny_config(tmp_path / "run", f"data.source={source}", "data.version=data-0000000000000000"))
    pinned = content_id(str(source), "data", tiny_config(tmp_path))
    assert prepare.run(tiny_config(tmp_path / "run", f"data.source={source}", f"data.version={pinned}"))[
        "data_version"] == pinned


# ---------------------------------------------------------------- corpus


def test_corpus_from_builtin_glyphs(tmp_path: Path, capsys):
    cfg = tiny_config(tmp_path, "pretrain.glyphs_per_class=10", "data.image_size=12", "data.channels=3")
    summary = corpus.run(cfg)
    out = tmp_path / "data" / "corpus"
    manifest = read_json(out / "manifest.json")
    assert manifest["classes"] == list("0123456789") and manifest["image_shape"] == [12, 12, 3]
    assert manifest["split_counts"] == {"train": 90, "val": 10} and set(manifest["shards"]) == {"train", "val"}
    assert manifest["data_version"].startswith("corpus-") and manifest["data_version"] == summary["data_version"]
    assert manifest["data_version"] == content_id("builtin:glyphs", "corpus", cfg)
    images, labels, _ = _samples(out, "val")
    assert sorted(labels.tolist()) == list(range(10))  # stratified: one of each digit
    assert images.shape == (10, 12, 12, 3) and images.max() == 255
    from pipeline.data.glyphs import render_glyphs

    rendered, rendered_labels = render_glyphs(10, (3, 12, 12), cfg.seed)
    train, train_labels, keys = _samples(out, "train")
    index = [int(k) for k in keys]
    assert np.array_equal(train, rendered[index]) and np.array_equal(train_labels, rendered_labels[index])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("[corpus] 100 images, 10 classes")


def test_corpus_from_unlabelled_folder(tmp_path: Path):
    source = tmp_path / "unlabelled"
    for i in range(12):
        write_photo(source / (f"day{i % 3}" if i % 2 else "") / f"{i}.png", size=(30 + i, 24), seed=i)
    cfg = tiny_config(tmp_path / "run", f"pretrain.source={source}", "pretrain.objective=simclr",
                      "data.image_size=16", "pretrain.val_fraction=0.25")
    summary = corpus.run(cfg)
    out = tmp_path / "run" / "data" / "corpus"
    manifest = read_json(out / "manifest.json")
    assert manifest["classes"] == [] and manifest["class_counts"] == {}
    assert manifest["split_counts"] == {"train": 9, "val": 3} and summary["images"] == 12
    assert all(f["class"] is None for f in manifest["files"])
    images, labels, _ = _samples(out, "train")
    assert images.shape == (9, 16, 16, 1) and set(labels.tolist()) == {UNLABELLED}
    assert manifest["data_version"] == content_id(str(source), "corpus", cfg)


def test_supervised_pretraining_needs_labels(tmp_path: Path):
    source = tmp_path / "unlabelled"
    for i in range(4):
        write_photo(source / f"{i}.jpg", seed=i)
    with pytest.raises(DataError, match="pretrain.objective=supervised needs a labelled corpus"):
        corpus.run(tiny_config(tmp_path / "run", f"pretrain.source={source}", "pretrain.objective=supervised"))


def test_corpus_without_readable_images(tmp_path: Path):
    source = tmp_path / "empty"
    source.mkdir()
    (source / "readme.txt").write_text("nothing here")
    (source / "fake.jpg").write_text("not a jpeg")
    with pytest.raises(DataError) as err:
        corpus.run(tiny_config(tmp_path / "run", f"pretrain.source={source}", "pretrain.objective=simclr"))
    text = err.value.render()
    assert f"{source}/fake.jpg: not an image" in text and f"{source}: 0 readable image(s)" in text
    assert not (tmp_path / "run" / "data" / "corpus").exists()


def test_corpus_version_pin(tmp_path: Path):
    with pytest.raises(DataError, match="pretrain.version pins corpus-0000000000000000"):
        corpus.run(tiny_config(tmp_path, "pretrain.version=corpus-0000000000000000"))


# ---------------------------------------------------------------- S3 source


@pytest.mark.slow
def test_s3_source_cached_by_etag_and_decoded_once(s3, tmp_path: Path, capsys, monkeypatch):
    source = s3.upload_image_folder(tmp_path / "images", "source/digits", classes=3, per_class=5)
    cfg = tiny_config(tmp_path / "a", f"data.source={source}", "data.image_size=8", "data.num_workers=2")
    first = prepare.run(cfg)
    assert "15 images, 15 downloaded, 0 from the local cache" in capsys.readouterr().out
    second = prepare.run(tiny_config(tmp_path / "b", f"data.source={source}", "data.image_size=8"))
    assert "15 images, 0 downloaded, 15 from the local cache" in capsys.readouterr().out
    assert (first["decoded"], second["reused"]) == (15, 15)
    manifest = read_json(tmp_path / "a/data/prepared/manifest.json")
    assert manifest["files"][0]["path"] == f"{source}/digit0/000.png"
    assert manifest["data_version"] == content_id(str(tmp_path / "images"), "data", cfg)  # same bytes, same id
    # No local caches at all: workers read the objects themselves.
    monkeypatch.setenv("PIPELINE_CACHE_DIR", "off")
    third = prepare.run(tiny_config(tmp_path / "c", f"data.source={source}", "data.image_size=8",
                                    "data.num_workers=2"))
    assert "15 images, 15 downloaded" in capsys.readouterr().out and third["decoded"] == 15
    assert _shard_bytes(tmp_path / "c/data/prepared") == _shard_bytes(tmp_path / "a/data/prepared")
