"""Locations are fsspec URIs: a local path or s3://bucket/prefix, through one API.

Outputs become visible only when complete. A stage builds its output folder in a local
staging directory; `publish` then moves it into place (local: one rename) or uploads it
and writes the `_COMPLETE` marker last (object stores have no directory rename).
Readers call `require_complete`, so a crash mid-write never feeds a later stage.

On S3 the slow part (the upload) goes to a hidden sibling prefix while the previous output
stays complete and readable; only then is the output switched over by fast server-side copies,
with the marker removed first and written last (see `_publish_remote`). S3 settings (endpoint,
retries, timeouts) live in pipeline/s3.py; credentials only ever come from the AWS chain.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

from pipeline import s3
from pipeline.errors import DataError

COMPLETE_MARKER = "_COMPLETE"

s3.configure()  # before any S3FileSystem exists: ours, Lightning's and DVC's in this process


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(uri)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


@contextlib.contextmanager
def access_errors(uri: str) -> Iterator[None]:
    """Missing or forbidden locations are the user's to fix (exit 2), named in the message.

    s3fs turns NoSuchBucket and NoSuchKey into FileNotFoundError and AccessDenied (also bad keys
    and signatures) into PermissionError, with S3's message, which names neither bucket nor key.
    """
    try:
        yield
    except FileNotFoundError as exc:
        raise DataError(_describe_missing(uri, exc)) from None
    except PermissionError as exc:
        where = f" (bucket {s3.split_uri(uri)[0]!r})" if is_remote(uri) else ""
        raise DataError(f"{uri}: access denied{where}: {exc}; check the credentials in use and the "
                        "IAM/bucket policy") from None
    except Exception as exc:
        if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):  # botocore's
            raise DataError(f"{uri}: no AWS credentials found ({exc}); set them the standard way: "
                            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or IRSA") from None
        raise


def _describe_missing(uri: str, exc: BaseException) -> str:
    if not is_remote(uri):
        return f"{uri}: not found ({exc})"
    bucket, key = s3.split_uri(uri)
    code = _error_code(exc)
    if code == "NoSuchBucket" or "bucket does not exist" in str(exc):
        return f"{uri}: bucket {bucket!r} does not exist (NoSuchBucket)"
    return f"{uri}: not found (key {key!r} in bucket {bucket!r}{', NoSuchKey' if code == 'NoSuchKey' else ''})"


def _error_code(exc: BaseException) -> str | None:
    cause = exc.__cause__
    response = getattr(cause, "response", None) or {}
    return response.get("Error", {}).get("Code")


def exists(uri: str) -> bool:
    """Whether `uri` exists. A missing S3 *bucket* is not "no such file" but a configuration error."""
    fs, path = filesystem(uri)
    with access_errors(uri):
        if fs.exists(path):
            return True
        if is_remote(uri) and uri.startswith("s3://"):
            check_bucket(uri)
        return False


def check_buckets(uris) -> None:
    """Before any compute: every S3 bucket among `uris` exists and is ours to use, else exit 2 naming it."""
    seen: dict[str, str] = {}
    for uri in uris:
        if uri.startswith("s3://"):
            seen.setdefault(s3.split_uri(uri)[0], uri)
    problems: list[str] = []
    for uri in seen.values():
        try:
            check_bucket(uri)
        except DataError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DataError(problems)


def check_bucket(uri: str) -> None:
    """Raise DataError (exit 2) naming the bucket if it is missing or forbidden. One HEAD request."""
    fs, _ = filesystem(uri)
    bucket = s3.split_uri(uri)[0]
    with access_errors(f"s3://{bucket}"):
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise DataError(f"{uri}: bucket {bucket!r} does not exist (NoSuchBucket)") from None


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
    _publish_remote(staging, uri)


def _publish_remote(staging: Path, uri: str) -> None:
    """Object stores have no rename. Upload aside, then switch over quickly, marker last.

    1. Upload every file to a hidden sibling prefix (`.<name>.staging-<id>/`). This is the slow,
       crash-prone part; meanwhile the previous output at `uri` is untouched and still complete.
    2. Delete `uri/_COMPLETE` (readers now refuse), copy the files into `uri/` server-side (no
       data through this machine: seconds even for large models), delete files the new
       output no longer has, and write `_COMPLETE` last. A crash here leaves no marker: the
       output is refused, never used half-written.
    3. Remove the upload prefix. (A SIGKILL mid-upload leaves it behind, invisible to readers.)
    """
    fs, path = filesystem(uri)
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    upload = f"{parent}/.{name}.staging-{uuid.uuid4().hex[:12]}" if parent else f"{path}.staging-{uuid.uuid4().hex[:12]}"
    files = sorted(f.relative_to(staging).as_posix() for f in staging.rglob("*")
                   if f.is_file() and f.name != COMPLETE_MARKER)
    marker = f"{path}/{COMPLETE_MARKER}"
    with access_errors(uri):
        try:
            for rel in files:
                fs.put_file(str(staging / rel), f"{upload}/{rel}")
            fs.invalidate_cache(path)
            previous = set(fs.find(path)) if fs.exists(path) else set()
            if marker in previous:
                fs.rm_file(marker)
            if files:
                fs.copy([f"{upload}/{rel}" for rel in files], [f"{path}/{rel}" for rel in files])
            stale = sorted(previous - {f"{path}/{rel}" for rel in files} - {marker})
            if stale:
                fs.rm(stale)
            fs.pipe_file(marker, b"")  # last: the output now counts
        finally:
            with contextlib.suppress(Exception):
                fs.rm(upload, recursive=True)


def fetch_dir(uri: str, local: Path) -> Path:
    """A local copy of a complete output folder (a no-op path for local URIs)."""
    if not is_remote(uri):
        return Path(uri)
    fs, path = filesystem(uri)
    with access_errors(uri):
        fs.get(path.rstrip("/") + "/", str(local), recursive=True)
    return local
