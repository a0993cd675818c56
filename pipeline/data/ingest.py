"""Scanned source -> split -> decoded shards + manifest: the one ingest path of `prepare` and `corpus`.

Order of work, cheapest first, so a bad source fails before an hour of decoding: the scan (listing,
hashes, headers) is already done; its problems, if any, fail the stage after a check-only decode of
the rest (so decode-time problems such as truncated files are reported in the same run, and what
decoded fine is cached for the next); then the version pin; then a seeded split; then decoding,
streamed in order into webdataset shards inside a staged output (published only when complete).

Within each split the samples are written in a seeded random order, so every shard mixes classes:
the trainer shuffles shard order and samples within a shard, never across the whole split.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline import storage
from pipeline.config import Config
from pipeline.data.decoded_cache import DecodedCache
from pipeline.data.decoding import Decoder
from pipeline.data.images import Transform
from pipeline.data.shards import Sample, samples_per_shard, write_split
from pipeline.data.sources import SourceScan
from pipeline.data.splits import SPLITS
from pipeline.runinfo import write_usage
from pipeline.errors import DataError

DOWNSCALE_WARNING = 4  # median source side >= this x image_size: the user probably forgot data.image_size


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Split codes (pipeline.data.splits.SPLITS) of train/val/test, each class in proportion."""
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed
    )
    split = np.empty(len(labels), dtype=np.int8)
    split[train], split[val], split[test] = SPLITS["train"], SPLITS["val"], SPLITS["test"]
    return split


def holdout_split(labels: np.ndarray, val_fraction: float, seed: int, stratify: bool) -> np.ndarray:
    """Split codes of train/val: stratified for a labelled corpus, uniformly random for an unlabelled one."""
    index = np.arange(len(labels))
    train, val = train_test_split(index, test_size=val_fraction, stratify=labels if stratify else None,
                                  random_state=seed)
    split = np.empty(len(labels), dtype=np.int8)
    split[train], split[val] = SPLITS["train"], SPLITS["val"]
    return split


def ingest(cfg: Config, scan: SourceScan, *, stage: str, out_uri: str, splits: tuple[str, ...],
           assign: Callable[[np.ndarray], np.ndarray], pin_key: str, pin: str | None, image_size: int) -> dict:
    """Write `scan` as a prepared dataset at `out_uri` -> the summary. `assign(labels)` gives split codes.

    `image_size`: data.image_size resolved (sources.image_size_for). The summary written into the output holds
    only what the data determines; timings and counts of reused work go to the stage's run report
    (pipeline/runinfo.py), and the returned dict holds both."""
    started = time.perf_counter()
    transform = Transform(image_size, cfg.data.channels)
    workers = cfg.data.num_workers or os.cpu_count() or 1
    decoder = Decoder(transform, workers, DecodedCache.default(), stage)
    if scan.problems and scan.items:
        print(f"[{stage}] {len(scan.problems)} problem(s) in {scan.source}; decoding the other {len(scan.items)} "
              "image(s) to report any more in this run (what decodes is cached for the next)", flush=True)
        for _ in decoder.stream(scan.items):
            pass
    if scan.problems:
        raise DataError(scan.problems + decoder.problems)
    version = scan.content_id()
    if pin is not None and pin != version:
        raise DataError(f"{scan.source}: content is {version} but {pin_key} pins {pin}; "
                        "the source changed after it was versioned")
    labels = np.asarray([item.label for item in scan.items], dtype=np.int64)
    try:
        split = assign(labels)
    except ValueError as exc:  # sklearn: a held-out share smaller than the number of classes, ...
        raise DataError(f"{scan.source}: cannot split {len(labels)} images into {'/'.join(splits)} with the "
                        f"configured fractions ({exc}); add images or hold out larger fractions") from None
    _warn_if_downscaled(scan, transform, stage)

    with storage.staged_output(out_uri) as out:
        shards = _write_shards(out, scan, split, splits, decoder, cfg)
        if decoder.problems:
            raise DataError(decoder.problems)
        manifest = _manifest(cfg, scan, version, split, splits, transform, shards)
        storage.write_json(str(out / "manifest.json"), manifest)
        summary = {
            "stage": stage,
            "data_version": version,
            "images": len(scan.items),
            "classes": len(scan.classes),
            "image_size": transform.image_size,
            "shards": sum(len(entries) for entries in shards.values()),
        }
        storage.write_json(str(out / "summary.json"), summary)  # a pure function of code, params and data
    wall = time.perf_counter() - started
    usage = {
        "decoded": decoder.decoded,
        "reused": decoder.reused,
        "workers": workers,
        "wall_time_s": round(wall, 3),
        "device_hours": round(wall / 3600, 6),  # one process (its decoding workers included), no accelerator
        "device_kind": "cpu",
        "images_per_s": round(len(scan.items) / max(wall, 1e-9), 1),
    }
    write_usage(cfg, stage, usage)
    classes = f"{len(scan.classes)} classes" if scan.labelled else "unlabelled"
    print(f"[{stage}] {len(scan.items)} images, {classes}, {transform.image_size} px, splits "
          f"{manifest['split_counts']}, version {version}")
    return {**summary, **usage}


def _write_shards(out: Path, scan: SourceScan, split: np.ndarray, splits: tuple[str, ...], decoder: Decoder,
                  cfg: Config) -> dict[str, list[dict]]:
    """Decode every item once, in write order, streaming each split into its shards."""
    orders = []
    for name in splits:
        members = np.flatnonzero(split == SPLITS[name])
        orders.append(members[_rng(cfg.seed, name).permutation(len(members))])
    order = np.concatenate(orders)
    stream = zip(order, decoder.stream([scan.items[i] for i in order]))
    per_shard = samples_per_shard(decoder.transform.shape, cfg.data.shard_mb)
    shards = {}
    for name, members in zip(splits, orders):
        samples = (Sample(f"{index:08d}", pixels, item.label)
                   for index, (item, pixels) in itertools.islice(stream, len(members)) if pixels is not None)
        shards[name] = write_split(out, name, samples, per_shard)
    return shards


def _rng(seed: int, split: str) -> np.random.Generator:
    # Independent of Python's per-process str hash; any int seed (negative too) works.
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}/{split}".encode()).digest()[:8], "little"))


def _manifest(cfg: Config, scan: SourceScan, version: str, split: np.ndarray, splits: tuple[str, ...],
              transform: Transform, shards: dict[str, list[dict]]) -> dict:
    names = {SPLITS[name]: name for name in splits}
    counts = collections.Counter(item.label for item in scan.items)
    return {
        "data_version": version,
        "source": scan.source,
        "classes": scan.classes,
        "class_counts": {name: counts[label] for label, name in enumerate(scan.classes)},
        "split_counts": {name: int((split == SPLITS[name]).sum()) for name in splits},
        "image_shape": list(transform.shape),
        "transform": {"image_size": transform.image_size, "channels": transform.channels,
                      "resize": "shorter side, centre crop", "exif_transpose": True},
        "source_stats": {
            "sizes": dict(collections.Counter(f"{i.width}x{i.height}" for i in scan.items).most_common(20)),
            "modes": dict(collections.Counter(i.mode for i in scan.items).most_common()),
        },
        "seed": cfg.seed,
        "files": [{"key": f"{index:08d}", "path": item.path, "sha256": item.sha256,
                   "class": scan.class_name(item), "split": names[int(code)]}
                  for index, (item, code) in enumerate(zip(scan.items, split))],
        "shards": shards,
    }


def _warn_if_downscaled(scan: SourceScan, transform: Transform, stage: str) -> None:
    sides = [min(item.width, item.height) for item in scan.items]
    median = statistics.median(sides) if sides else 0
    if median >= DOWNSCALE_WARNING * transform.image_size:
        print(f"[{stage}] warning: images are ~{median:.0f} px, resized down to {transform.image_size} px "
              "(data.image_size); photos want e.g. --set data.image_size=224 --set data.channels=3", flush=True)
