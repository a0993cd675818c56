"""Local cache of decoded, transformed images, keyed by the source file's sha256 and the transform.

Decoding and resizing is the slow part of `prepare` and `corpus` (milliseconds per photo); a re-run
after adding a few images, or a run that failed on one bad file, decodes only what it has not seen.
It lives beside the S3 object cache (`PIPELINE_CACHE_DIR`, default ~/.cache/pipeline; `off` disables
both). A cache that cannot be read or written costs speed, never correctness: any failure is a miss.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from pipeline import s3
from pipeline.data.images import Transform


class DecodedCache:
    def __init__(self, root: Path | None):
        self.root = root

    @classmethod
    def default(cls) -> "DecodedCache":
        base = s3.cache_dir()  # <base>/s3, or None when caching is off
        return cls(None if base is None else base.parent / "decoded")

    def _slot(self, sha256: str, transform: Transform) -> Path:
        return self.root / transform.key / sha256[:2] / f"{sha256}.npy"

    def has(self, sha256: str, transform: Transform) -> bool:
        return self.root is not None and self._slot(sha256, transform).is_file()

    def get(self, sha256: str, transform: Transform) -> np.ndarray | None:
        if self.root is None:
            return None
        try:
            array = np.load(self._slot(sha256, transform), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        # A file of another shape or type is foreign or damaged: decode again rather than trust it.
        return array if array.shape == transform.shape and array.dtype == np.uint8 else None

    def put(self, sha256: str, transform: Transform, array: np.ndarray) -> None:
        """Write-then-rename: a killed run never leaves half an image (no fsync: it is a cache)."""
        if self.root is None:
            return
        path = self._slot(sha256, transform)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
