"""Atomic outputs: a crash mid-write leaves the previous output intact and never feeds a later stage."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.errors import DataError


class Crash(Exception):
    pass


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_staged_output_publishes_with_marker(tmp_path: Path):
    target = tmp_path / "out"
    with storage.staged_output(str(target)) as staging:
        assert staging.is_dir() and not any(staging.iterdir())
        assert not target.exists()  # nothing visible while writing
        (staging / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert (target / storage.COMPLETE_MARKER).exists()
    storage.require_complete(str(target), produced_by="prepare")
    assert _leftovers(tmp_path) == []


def test_staged_output_crash_keeps_previous_output(tmp_path: Path):
    target = tmp_path / "out"
    with storage.staged_output(str(target)) as staging:
        (staging / "a.txt").write_text("old")
    with pytest.raises(Crash):
        with storage.staged_output(str(target)) as staging:
            (staging / "a.txt").write_text("half")
            (staging / "b.txt").write_text("half")
            raise Crash()
    assert sorted(p.name for p in target.iterdir()) == ["_COMPLETE", "a.txt"]
    assert (target / "a.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []  # the half-written staging folder is gone


def test_staged_output_crash_without_previous_leaves_nothing(tmp_path: Path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with storage.staged_output(str(target)) as staging:
            (staging / "a.txt").write_text("half")
            raise KeyboardInterrupt()
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_killed_staging_is_never_complete(tmp_path: Path):
    """A process killed mid-write (no cleanup ran) leaves a staging folder without _COMPLETE."""
    target = tmp_path / "out"
    context = storage.staged_output(str(target))
    staging = context.__enter__()
    (staging / "a.txt").write_text("half")
    # Simulate SIGKILL: the context never exits. The staging folder is hidden and unmarked.
    assert staging.parent == tmp_path and staging.name.startswith(".")
    assert not (staging / storage.COMPLETE_MARKER).exists()
    assert not target.exists()
    with pytest.raises(DataError, match="no complete output"):
        storage.require_complete(str(target), produced_by="prepare")
    context.__exit__(None, None, None)  # tidy up the generator


def test_require_complete_rejects_folder_without_marker(tmp_path: Path):
    half = tmp_path / "prepared"
    half.mkdir()
    (half / "dataset.npz").write_bytes(b"partial")
    with pytest.raises(DataError) as err:
        storage.require_complete(str(half), produced_by="prepare")
    assert str(half) in err.value.render() and "pipeline prepare" in err.value.render()


def test_write_bytes_replaces_atomically(tmp_path: Path):
    target = tmp_path / "sub" / "metrics.json"
    storage.write_bytes(str(target), b"first")
    storage.write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert _leftovers(target.parent) == []


def test_write_bytes_failure_keeps_old_content(tmp_path: Path, monkeypatch):
    target = tmp_path / "metrics.json"
    storage.write_bytes(str(target), b"old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes(str(target), b"new and half written")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []  # no temp file left behind


def test_json_round_trip(tmp_path: Path):
    uri = str(tmp_path / "x.json")
    storage.write_json(uri, {"b": 1, "a": [1, 2]})
    assert storage.read_json(uri) == {"a": [1, 2], "b": 1}
    assert storage.exists(uri) and not storage.exists(uri + ".nope")


def test_missing_file_is_a_data_error_naming_it(tmp_path: Path):
    uri = str(tmp_path / "missing.bin")
    with pytest.raises(DataError, match="missing.bin: not found"):
        storage.read_bytes(uri)


def test_uri_helpers():
    assert storage.is_remote("s3://bucket/x")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert storage.join("s3://b/p/", "a", "b.json") == "s3://b/p/a/b.json"
    assert storage.fetch_dir("/tmp/local", Path("/unused")) == Path("/tmp/local")
