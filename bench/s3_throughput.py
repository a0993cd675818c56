"""First-epoch vs later-epoch read throughput of an ImageFolder on S3 (moto) against local disk.

An "epoch" here is one full read of the source through `pipeline.data.sources.scan_source`,
what `prepare` and `corpus` do first: list, fetch, hash and read the header of every image. Epoch 1 from S3 starts with an
empty local cache (every object is a GET); epochs 2+ find every object in the ETag-keyed
cache and only list the bucket. The local-disk baseline reads the same files from a folder.
Also: one large blob (a prepared dataset / checkpoint) read from S3 vs local disk, which is
what every stage does once (prepared data is loaded into memory once per stage).

    python -m bench.s3_throughput                   # 3 x 600 PNGs, 3 epochs
    python -m bench.s3_throughput --per-class 2000 --epochs 4 --blob-mb 64

moto runs as its own process (`python -m moto.server`) on 127.0.0.1, so this measures the
client path (HTTP, signing, s3fs) against a fast local server, not a real network.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from pipeline.localserver import free_port, start_moto


def _write_images(root: Path, classes: int, per_class: int, size: int) -> int:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    total = 0
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")
            total += (folder / f"{i:05d}.png").stat().st_size
    return total


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (RGB PNG)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--blob-mb", type=int, default=32)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="s3-bench-"))
    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true", PIPELINE_CACHE_DIR=str(work / "cache"))
    server = start_moto(port)
    try:
        import contextlib
        import io

        from pipeline import storage
        from pipeline.config import Config
        from pipeline.data.sources import scan_source

        cfg = Config()
        local = work / "images"
        nbytes = _write_images(local, args.classes, args.per_class, args.size)
        count = args.classes * args.per_class
        fs = storage.filesystem("s3://bench")[0]
        fs.mkdir("bench")
        fs.put(str(local) + "/", "bench/images", recursive=True)
        def epoch(source: str) -> float:
            with contextlib.redirect_stdout(io.StringIO()):  # the scan's one-line cache report
                return _timed(lambda: scan_source(source, "data", cfg))

        local_s = [epoch(str(local)) for _ in range(args.epochs)]
        s3_s = [epoch("s3://bench/images") for _ in range(args.epochs)]

        blob = os.urandom(args.blob_mb << 20)
        (work / "blob.bin").write_bytes(blob)
        storage.write_bytes("s3://bench/blob.bin", blob)
        blob_local = min(_timed(lambda: storage.read_bytes(str(work / "blob.bin"))) for _ in range(3))
        blob_s3 = min(_timed(lambda: storage.read_bytes("s3://bench/blob.bin")) for _ in range(3))
    finally:
        server.terminate()
        server.wait(timeout=30)

    local_best = min(local_s)
    print(f"ImageFolder: {count} PNGs ({args.size}x{args.size} RGB), {nbytes / 1e6:.1f} MB; moto on 127.0.0.1")
    print(f"{'read':<34}{'seconds':>9}{'images/s':>11}{'MB/s':>8}{'vs local':>10}")
    rows = [("local disk (best epoch)", local_best),
            ("S3 epoch 1 (cold cache: GETs)", s3_s[0]),
            *[(f"S3 epoch {i + 1} (local cache, LIST)", t) for i, t in enumerate(s3_s[1:], start=1)]]
    for name, seconds in rows:
        print(f"{name:<34}{seconds:>9.2f}{count / seconds:>11.0f}{nbytes / 1e6 / seconds:>8.1f}"
              f"{local_best / seconds:>9.2f}x")
    later = min(s3_s[1:]) if len(s3_s) > 1 else float("nan")
    print(f"ratio S3 epoch 1 / local disk throughput:      {local_best / s3_s[0]:.2f}")
    print(f"ratio S3 later epochs / local disk throughput: {local_best / later:.2f}")
    print(f"ratio S3 later epochs / S3 epoch 1:            {s3_s[0] / later:.2f}")
    print(f"{args.blob_mb} MB blob read once: local {args.blob_mb / blob_local:.0f} MB/s, "
          f"S3 {args.blob_mb / blob_s3:.0f} MB/s, ratio S3/local {blob_local / blob_s3:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
