"""Stage 1: read `data.source`, validate it, make seeded stratified splits, write dataset + manifest.

    python -m pipeline prepare                                   # builtin:digits
    python -m pipeline prepare --set data.source=/data/pets      # local ImageFolder
    python -m pipeline prepare --set data.source=s3://bucket/pets
"""
from __future__ import annotations

import hashlib
import io
import time

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline import storage
from pipeline.config import Config
from pipeline.data.sources import RawDataset, load_source
from pipeline.data.tasks import SPLITS
from pipeline.errors import DataError

MIN_IMAGES_PER_CLASS = 3  # one each for train, val and test


def data_version(raw: RawDataset) -> str:
    """Content id of the source: same images and labels -> same id, wherever they live."""
    digest = hashlib.sha256()
    for file_hash, label in sorted(zip(raw.hashes, (raw.class_names[i] for i in raw.labels))):
        digest.update(f"{file_hash} {label}\n".encode())
    return "data-" + digest.hexdigest()[:16]


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed
    )
    split = np.empty(len(labels), dtype=np.int8)
    split[train], split[val], split[test] = SPLITS["train"], SPLITS["val"], SPLITS["test"]
    return split


def run(cfg: Config) -> dict:
    started = time.perf_counter()
    raw = load_source(cfg.data.source)
    counts = np.bincount(raw.labels, minlength=len(raw.class_names))
    too_small = [f"{cfg.data.source}/{name}: {n} image(s); need at least {MIN_IMAGES_PER_CLASS}"
                 for name, n in zip(raw.class_names, counts) if n < MIN_IMAGES_PER_CLASS]
    if too_small:
        raise DataError(too_small)
    split = stratified_split(raw.labels, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
    version = data_version(raw)
    if cfg.data.version is not None and cfg.data.version != version:
        raise DataError(f"{cfg.data.source}: content is {version} but data.version pins {cfg.data.version}; "
                        "the source changed after it was versioned")
    split_names = {v: k for k, v in SPLITS.items()}
    manifest = {
        "data_version": version,
        "source": cfg.data.source,
        "classes": raw.class_names,
        "class_counts": {name: int(n) for name, n in zip(raw.class_names, counts)},
        "split_counts": {name: int((split == code).sum()) for name, code in SPLITS.items()},
        "image_shape": list(raw.images.shape[1:]),
        "seed": cfg.seed,
        "files": [
            {"path": f, "sha256": h, "class": raw.class_names[label], "split": split_names[int(s)]}
            for f, h, label, s in zip(raw.files, raw.hashes, raw.labels, split)
        ],
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=raw.images, labels=raw.labels, split=split)
    with storage.staged_output(cfg.paths.uri("prepared")) as out:
        (out / "dataset.npz").write_bytes(buffer.getvalue())
        storage.write_json(str(out / "manifest.json"), manifest)
        summary = {
            "stage": "prepare",
            "data_version": version,
            "images": len(raw.labels),
            "classes": len(raw.class_names),
            "wall_time_s": round(time.perf_counter() - started, 3),
        }
        storage.write_json(str(out / "summary.json"), summary)
    print(f"[prepare] {len(raw.labels)} images, {len(raw.class_names)} classes, "
          f"splits {manifest['split_counts']}, version {version}")
    return summary
