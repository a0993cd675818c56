"""Locations are fsspec URIs: a local path or s3://bucket/prefix, through one API.

Outputs become visible only when complete. A stage builds its output folder in a local
staging directory; `publish` then moves it into place (local: one rename) or uploads it
and writes the `_COMPLETE` marker last (object stores have no directory rename).
Readers call `require_complete`, so a crash mid-write never feeds a later stage.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

from pipeline.errors import DataError

COMPLETE_MARKER = "_COMPLETE"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(uri)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


@contextlib.contextmanager
def access_errors(uri: str) -> Iterator[None]:
    """Missing or forbidden locations are the user's to fix (exit 2), named in the message."""
    try:
        yield
    except FileNotFoundError as exc:
        raise DataError(f"{uri}: not found ({exc})") from None
    except PermissionError as exc:
        raise DataError(f"{uri}: access denied ({exc})") from None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with access_errors(uri):
        return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with access_errors(uri):
        return fs.cat_file(path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic for readers: local files are renamed into place; an S3 PUT is all-or-nothing."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        with access_errors(uri):
            fs.pipe_file(path, data)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(uri: str, payload: Any) -> None:
    write_bytes(uri, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def require_complete(uri: str, produced_by: str) -> None:
    """Refuse to read an output that is missing or was never finished."""
    if not exists(join(uri, COMPLETE_MARKER)):
        raise DataError(
            f"{uri}: no complete output here; run `pipeline {produced_by}` first"
            " (a folder without its _COMPLETE marker was interrupted mid-write)"
        )


@contextlib.contextmanager
def staged_output(uri: str) -> Iterator[Path]:
    """Yield an empty local folder; on success publish it at `uri`, on failure leave `uri` untouched."""
    parent = None if is_remote(uri) else Path(uri).parent
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    # A sibling of the target, so the final local move is a same-filesystem rename.
    staging = Path(tempfile.mkdtemp(prefix=f".{Path(uri).name}.staging-", dir=parent))
    try:
        yield staging
        (staging / COMPLETE_MARKER).write_text("")
        publish(staging, uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, uri: str) -> None:
    if not is_remote(uri):
        target = Path(uri)
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
        return
    fs, path = filesystem(uri)
    with access_errors(uri):
        if fs.exists(path):
            fs.rm(path, recursive=True)
        for file in sorted(staging.rglob("*")):
            if file.is_file() and file.name != COMPLETE_MARKER:
                fs.put_file(str(file), f"{path}/{file.relative_to(staging).as_posix()}")
        fs.pipe_file(f"{path}/{COMPLETE_MARKER}", b"")  # last: the output now counts


def fetch_dir(uri: str, local: Path) -> Path:
    """A local copy of a complete output folder (a no-op path for local URIs)."""
    if not is_remote(uri):
        return Path(uri)
    fs, path = filesystem(uri)
    with access_errors(uri):
        fs.get(path.rstrip("/") + "/", str(local), recursive=True)
    return local
