"""Stage 1: read `data.source`, validate it, split it (seeded, stratified), write shards + manifest.

    python -m pipeline prepare                                   # builtin:digits
    python -m pipeline prepare --set data.source=/data/pets      # local ImageFolder
    python -m pipeline prepare --set data.source=s3://bucket/pets --set data.image_size=224 --set data.channels=3

Any photos work: every image is EXIF-rotated, converted to `data.channels`, resized (shorter side to
`data.image_size`; `auto`: the source's own size when its images share one, docs/data.md) and
centre-cropped (pipeline/data/images.py). The work is shared with `corpus`
(pipeline/data/ingest.py); this stage only says which source, which splits, which pin.
"""
from __future__ import annotations

from pipeline.config import Config
from pipeline.data.ingest import ingest, stratified_split
from pipeline.data.sources import MIN_IMAGES, SourceScan, image_size_for, scan_source
from pipeline.errors import DataError

MIN_IMAGES_PER_CLASS = MIN_IMAGES["data"]  # one each for train, val and test

__all__ = ["MIN_IMAGES_PER_CLASS", "data_version", "run", "stratified_split"]


def data_version(scan: SourceScan) -> str:
    """Content id of the source: same images and labels -> same id, wherever they live."""
    return scan.content_id()


def run(cfg: Config) -> dict:
    data = cfg.data
    scan = scan_source(data.source, "data", cfg)
    size, problem = image_size_for(scan, cfg)
    if problem:  # before any decoding: nothing is written
        raise DataError([*scan.problems, problem])
    return ingest(cfg, scan, stage="prepare", out_uri=cfg.paths.uri("prepared"), image_size=size or 1,
                  splits=("train", "val", "test"), pin_key="data.version", pin=data.version,
                  assign=lambda labels: stratified_split(labels, data.val_fraction, data.test_fraction, cfg.seed))
