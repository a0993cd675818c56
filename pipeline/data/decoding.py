"""Decode and transform many images on worker processes, yielding them in the order asked.

`prepare` and `corpus` stream the results straight into shards, so only a bounded window of decoded
images is ever in memory. A file decoded before (same sha256, same transform) comes from the
decoded-image cache instead. Workers come from a forkserver: a forked child of a process that runs
threads (s3fs's event loop, the hashing pass's pool) can deadlock on a lock one of them held.
"""
from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from pipeline.data.decoded_cache import DecodedCache
from pipeline.data.glyphs import GlyphParams, render_glyph
from pipeline.data.images import Transform, decode, transform_array
from pipeline.data.object_cache import read_origin
from pipeline.data.sources import Item
from pipeline.errors import DataError

BATCH = 8  # images per task: amortises inter-process overhead, keeps the window small
PROGRESS_AFTER_S = 10.0  # quick runs stay quiet; longer ones report every 10%


def load_item(item: Item, transform: Transform, cache: DecodedCache) -> tuple[np.ndarray, bool]:
    """-> (pixels uint8 transform.shape, whether they came from the cache)."""
    origin = item.origin
    if isinstance(origin, np.ndarray):
        return transform_array(origin, transform), False
    if isinstance(origin, GlyphParams):
        return render_glyph(origin, transform.image_size, transform.image_size, transform.channels), False
    cached = cache.get(item.sha256, transform)
    if cached is not None:
        return cached, True
    data = read_origin(origin, item.path)
    if hashlib.sha256(data).hexdigest() != item.sha256:
        raise DataError(f"{item.path}: changed while being prepared; run again once the source is stable")
    pixels = decode(data, item.path, transform)
    cache.put(item.sha256, transform, pixels)
    return pixels, False


def _load_batch(items: list[Item], transform: Transform, cache: DecodedCache) -> list[tuple]:
    results = []
    for item in items:
        try:
            results.append((*load_item(item, transform, cache), None))
        except DataError as exc:
            results.append((None, False, "; ".join(exc.problems)))
    return results


class Decoder:
    """`stream(items)` yields (item, pixels or None) in order; problems, counts gathered on the way."""

    def __init__(self, transform: Transform, workers: int, cache: DecodedCache, label: str):
        self.transform, self.workers, self.cache, self.label = transform, workers, cache, label
        self.decoded = self.reused = 0
        self.problems: list[str] = []

    def stream(self, items: Sequence[Item]) -> Iterator[tuple[Item, np.ndarray | None]]:
        started, done, step = time.perf_counter(), 0, max(1, len(items) // 10)
        for item, (pixels, reused, problem) in zip(items, self._results(items)):
            self.reused += reused
            self.decoded += pixels is not None and not reused
            if problem:
                self.problems.append(problem)
            done += 1
            elapsed = time.perf_counter() - started
            if done % step == 0 and elapsed > PROGRESS_AFTER_S:
                print(f"[{self.label}] decoded {done}/{len(items)} images ({done / elapsed:.0f}/s, "
                      f"{self.reused} from the cache)", flush=True)
            yield item, pixels

    def _results(self, items: Sequence[Item]) -> Iterator[tuple]:
        batches = (list(items[i:i + BATCH]) for i in range(0, len(items), BATCH))
        # Nothing to decode (in-memory pixels, or every file decoded before: an unchanged source's re-run): reading
        # the cache here beats starting worker processes and piping every image back from them.
        if self.workers == 1 or all(_ready(item, self.transform) or self.cache.has(item.sha256, self.transform)
                                    for item in items):
            for batch in batches:
                yield from _load_batch(batch, self.transform, self.cache)
            return
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # workers start with numpy and Pillow imported
        pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_adopt_environment,
                                   initargs=(dict(os.environ),))
        try:
            pending = collections.deque()
            for batch in batches:
                pending.append(pool.submit(_load_batch, batch, self.transform, self.cache))
                if len(pending) >= 4 * self.workers:  # bounded read-ahead: memory stays a window
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _adopt_environment(environ: dict[str, str]) -> None:
    """Workers fork from the forkserver, which kept the environment of its start (the first pool in this
    process); give them today's (S3 endpoint, AWS settings) like any child process gets."""
    os.environ.clear()
    os.environ.update(environ)


def _ready(item: Item, transform: Transform) -> bool:
    """In-memory pixels already of the output shape (the digits demo): nothing for a worker to do."""
    return isinstance(item.origin, np.ndarray) and item.origin.shape == transform.shape
