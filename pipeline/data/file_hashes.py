"""What a local source file held when it was last read: its sha256 and header, remembered by the file's
path, size, mtime (ns) and inode, so a scan does not read an unchanged file again.

Every flow run scans its sources twice (the version, then `prepare` or `corpus`), and a re-run over an
unchanged folder of photos used to read and hash every byte each time. DVC keeps the same kind of state
for the same reason (`.dvc/tmp/...`): a file whose size, mtime and inode are unchanged is taken to hold
the same bytes. Those bytes are still checked wherever they are used: a decode re-hashes the file it
reads, so an image rewritten in place within one mtime tick fails loudly rather than silently.

One SQLite file beside the other caches (`PIPELINE_CACHE_DIR`, default ~/.cache/pipeline; `off`
disables every cache). Reads take one query per scan; writes one transaction. Any failure is a miss.
"""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from pipeline import s3

_SCHEMA = ("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ino INTEGER, "
           "sha256 TEXT, width INTEGER, height INTEGER, mode TEXT)")


@dataclass(frozen=True)
class Known:
    sha256: str
    width: int
    height: int
    mode: str


def _stamp(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


class FileHashes:
    """`lookup(path, stat)` answers from what `load(root)` read; `remember` queues, `save` writes them all."""

    def __init__(self, db: Path | None):
        self.db = db
        self._known: dict[str, tuple[tuple[int, int, int], Known]] = {}
        self._new: list[tuple] = []

    @classmethod
    def default(cls) -> "FileHashes":
        base = s3.cache_dir()  # <base>/s3, or None when caching is off
        return cls(None if base is None else base.parent / "file-hashes.sqlite")

    def _connect(self) -> sqlite3.Connection:
        self.db.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.db, timeout=30)  # two runs scanning at once wait for each other
        connection.execute(_SCHEMA)
        return connection

    def load(self, root: str) -> None:
        """What is known about the files under the local folder `root` (one query)."""
        if self.db is None:
            return
        prefix = os.path.join(os.path.abspath(root), "")
        try:
            with self._connect() as connection:
                rows = connection.execute("SELECT path, size, mtime_ns, ino, sha256, width, height, mode FROM files "
                                          "WHERE path >= ? AND path < ?", (prefix, prefix + "\uffff")).fetchall()
        except (sqlite3.Error, OSError):
            return
        self._known = {path: ((size, mtime, ino), Known(sha, width, height, mode))
                       for path, size, mtime, ino, sha, width, height, mode in rows}

    def lookup(self, path: str, stat: os.stat_result) -> Known | None:
        entry = self._known.get(os.path.abspath(path))
        return entry[1] if entry is not None and entry[0] == _stamp(stat) else None

    def remember(self, path: str, stat: os.stat_result, known: Known) -> None:
        """Safe from the scan's threads (list.append is atomic); written by save()."""
        if self.db is not None:
            self._new.append((os.path.abspath(path), *_stamp(stat), known.sha256, known.width, known.height,
                              known.mode))

    def save(self) -> None:
        new, self._new = self._new, []
        if self.db is None or not new:
            return
        try:
            with self._connect() as connection:
                connection.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", new)
        except (sqlite3.Error, OSError):
            pass  # a read-only or full cache disk costs speed, not correctness
