"""S3 source objects kept in a local cache keyed by bucket, key and ETag (pipeline/s3.py `cache_dir`),
so a re-run downloads only the objects that changed, and the bytes of any file-backed item.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage
from pipeline.errors import DataError


@dataclass(frozen=True)
class RemoteObject:
    """An object read from S3 on use: the local object cache is off or could not be written."""

    uri: str


def read_origin(origin: str | RemoteObject, shown: str) -> bytes:
    """The bytes of a file-backed item (any process: decode workers call this too)."""
    if isinstance(origin, RemoteObject):
        return storage.read_bytes(origin.uri)
    try:
        return Path(origin).read_bytes()
    except OSError as exc:
        raise DataError(f"{shown}: cannot read ({exc})") from None


def fetch(fs, name: str, info: dict, shown: str, cache: Path | None) -> tuple[bytes, str | RemoteObject, bool]:
    """(bytes, where later readers find them, whether they were downloaded): the local ETag-keyed copy if any."""
    if cache is None:
        return storage.read_bytes(shown), RemoteObject(shown), True
    version = info.get("ETag") or info.get("etag") or f"{info.get('size')}-{info.get('LastModified')}"
    digest = hashlib.sha256(f"s3\0{name}\0{version}".encode()).hexdigest()
    slot = cache / digest[:2] / digest
    if slot.is_file():
        try:
            return slot.read_bytes(), str(slot), False
        except OSError:
            pass
    with storage.access_errors(shown):
        data = fs.cat_file(name)
    return data, (str(slot) if _cache_put(slot, data) else RemoteObject(shown)), True


def _cache_put(path: Path, data: bytes) -> bool:
    """Write-then-rename, so a killed run never leaves a half image in the cache (no fsync: it is a cache)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return True
    except OSError:
        return False  # a read-only or full cache disk costs speed, not correctness
