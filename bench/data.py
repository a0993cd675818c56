"""Data at scale: prepare throughput, training-loader throughput, training memory vs dataset size.

    python -m bench.data                          # all three sections (~15-20 min on 2 cores; the first
                                                  #   run also generates the 20k-image folder, ~5 min, cached)
    python -m bench.data --quick                  # 2,000 images, 5,000 loader samples, 2k/20k corpora
    python -m bench.data --only loader --json data.json

Each section prints measured ratios beside its goal; method and recorded numbers are in
docs/benchmarks.md ("Data at scale"). Everything is written under a fresh tmp folder (or
--workdir) except the generated ImageFolder, cached in ~/.cache/pipeline/bench-imagefolder-<n>.

1. prepare: `pipeline.stages.prepare.run` on a generated ImageFolder (10 classes, JPEG and PNG,
   64..640 px, RGB, grayscale, RGBA and palette, some EXIF-rotated) to 64x64x3, with 1 worker and
   with os.cpu_count() workers, each with a fresh PIPELINE_CACHE_DIR (nothing reused); then the
   N-worker run again on the same cache (unchanged files: the incremental case, decoded 0).
2. loader: images/s through `ShardStream` (batch 256, 64x64x3, shuffled, each batch's float
   tensor touched with .sum() as a training step would read it): in-memory arrays
   (`InMemorySplit`, the old design) vs shards streamed from local disk vs shards on S3 (moto on
   127.0.0.1), epochs 1 and 2, streamed (cache_bytes=0) and with the default 1 GiB cache.
3. rss: peak RSS of `python -m pipeline pretrain` (one fresh process per measurement, measured by
   a wrapper with getrusage(RUSAGE_CHILDREN)) on a corpus of 32x32x3 images written directly as
   shards, at two dataset sizes, streamed (data.cache_mb=0) and held in memory (cache_mb large).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import goal_met, hardware
from bench.data_prepare import bench_prepare
from bench.data_rss import bench_rss

REPO = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "pipeline"
SECTIONS = ("prepare", "loader", "rss")

# ---------------------------------------------------------------- 2. loader

BATCH = 256


def _synthetic(count: int, shape_hwc: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, *shape_hwc), dtype=np.uint8), rng.integers(0, 10, count).astype(np.int64)


def _write_shards(out: Path, split: str, images: np.ndarray, labels: np.ndarray, shard_mb: int) -> list[dict]:
    from pipeline.data.shards import Sample, samples_per_shard, write_split

    per_shard = samples_per_shard(images.shape[1:], shard_mb)
    return write_split(out, split, (Sample(f"{i:08d}", images[i], int(labels[i])) for i in range(len(labels))),
                       per_shard)


def _epoch(stream, epoch: int) -> tuple[float, int]:
    """One epoch consumed as a training step reads it: the float batch is touched (.sum())."""
    stream.sampler.set_epoch(epoch)
    started, seen, total = time.perf_counter(), 0, 0.0
    for images, labels in stream:
        total += float(images.sum())
        seen += len(labels)
    return time.perf_counter() - started, seen


def bench_loader(work: Path, count: int, shard_mb: int, repeats: int, threads: int) -> dict:
    import torch

    from pipeline import storage
    from pipeline.data.shards import SplitShards
    from pipeline.data.stream import InMemorySplit, ShardStream
    from pipeline.localserver import free_port, start_moto

    shape = (64, 64, 3)
    torch.set_num_threads(threads)
    images, labels = _synthetic(count, shape)
    local = work / "loader"
    entries = _write_shards(local, "train", images, labels, shard_mb)
    uris = [str(local / e["name"]) for e in entries]
    counts = tuple(e["samples"] for e in entries)
    nbytes = sum(Path(u).stat().st_size for u in uris)
    print(f"  {count} samples 64x64x3 uint8, batch {BATCH}, shuffled; {len(uris)} shards of shard_mb={shard_mb} "
          f"({nbytes / 1e6:.0f} MB); {repeats} round-robin repeats; readahead 1 (trainer.num_workers=0, the default); "
          f"{threads} torch thread(s)")

    port = free_port()
    env_keys = dict(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                    AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.update(env_keys)
    from pipeline import s3
    s3.reset()
    server = start_moto(port)
    rows: dict[str, list[float]] = {}
    try:
        fs = storage.filesystem("s3://bench-data")[0]
        fs.mkdir("bench-data")
        s3_uris = []
        for uri, entry in zip(uris, entries):
            s3_uris.append(f"s3://bench-data/loader/{entry['name']}")
            storage.write_bytes(s3_uris[-1], Path(uri).read_bytes())
        local_split = SplitShards(tuple(uris), counts, (3, 64, 64))
        s3_split = SplitShards(tuple(s3_uris), counts, (3, 64, 64))

        configs = [  # (name, stream factory, epochs); run round-robin so background load hits all alike
            ("in memory (InMemorySplit)",
             lambda: ShardStream(InMemorySplit(images, labels), BATCH, seed=0, shuffle=True), 2),
            ("local shards, streamed", lambda: ShardStream(local_split, BATCH, seed=0, shuffle=True, cache_bytes=0), 2),
            ("local shards, 1 GiB cache (default)", lambda: ShardStream(local_split, BATCH, seed=0, shuffle=True), 2),
            ("S3 shards, streamed", lambda: ShardStream(s3_split, BATCH, seed=0, shuffle=True, cache_bytes=0), 2),
            ("S3 shards, streamed, readahead 4",
             lambda: ShardStream(s3_split, BATCH, seed=0, shuffle=True, cache_bytes=0, readahead=4), 1),
            ("S3 shards, 1 GiB cache (default)", lambda: ShardStream(s3_split, BATCH, seed=0, shuffle=True), 2),
        ]
        for _ in range(repeats):
            for name, make, epochs in configs:
                stream = make()
                for epoch in range(epochs):
                    seconds, seen = _epoch(stream, epoch)
                    assert seen == count, (name, seen, count)
                    rows.setdefault(f"{name}, epoch {epoch + 1}", []).append(count / seconds)
                del stream
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3.reset()

    # Best of the repeats: on a shared machine the fastest run is the one least disturbed by neighbours.
    best = {name: max(values) for name, values in rows.items()}
    medians = {name: statistics.median(values) for name, values in rows.items()}
    memory = [name for name in rows if name.startswith("in memory")]
    reference, reference_median = max(best[n] for n in memory), max(medians[n] for n in memory)
    goals = {"local shards, streamed, epoch 2": 0.9, "S3 shards, streamed, epoch 1": 0.5,
             "S3 shards, streamed, epoch 2": 0.9, "S3 shards, 1 GiB cache (default), epoch 2": 0.9,
             "local shards, 1 GiB cache (default), epoch 2": 0.9}
    print(f"  {'loader':<46}{'best img/s':>11}{'vs memory':>11}{'median':>9}{'vs memory':>11}   goal (on best)")
    for name, rate in best.items():
        goal = goals.get(name)
        verdict = f">= {goal}x: {goal_met(rate / reference >= goal)}" if goal else ""
        print(f"  {name:<46}{rate:>11.0f}{rate / reference:>10.2f}x{medians[name]:>9.0f}"
              f"{medians[name] / reference_median:>10.2f}x   {verdict}")
    return {"samples": count, "shards": len(uris), "shard_mb": shard_mb, "shard_bytes": nbytes,
            "torch_threads": threads, "repeats": repeats, "best_images_per_s": best, "median_images_per_s": medians,
            "all_runs": rows, "ratios_best": {name: rate / reference for name, rate in best.items()},
            "ratios_median": {name: rate / reference_median for name, rate in medians.items()}}


# ---------------------------------------------------------------- main

def torch_default_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 images, 5,000 loader samples, 2k/20k corpora")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--images", type=int, help="prepare: ImageFolder size (default 20000; --quick 2000)")
    parser.add_argument("--loader-samples", type=int, help="loader: samples (default 20000; --quick 5000)")
    parser.add_argument("--loader-shard-mb", type=int, default=8, help="loader: shard size (default 8: ~30 shards)")
    parser.add_argument("--repeats", type=int, help="loader: repeats of every configuration, round-robin (default 5; "
                                                     "--quick 1)")
    parser.add_argument("--rss-sizes", help="rss: two corpus sizes, e.g. 10000,100000 (default; --quick 2000,20000)")
    parser.add_argument("--rss-shard-mb", default="64,8",
                        help="rss: shard sizes to try (default 64 = params.yaml's, and 8)")
    parser.add_argument("--rss-big-cache-mb", type=int, default=4096, help="rss: cache_mb of the held-in-memory runs")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads of the loader section and of the rss runs' stage processes (default 1: "
                             "on a shared 2-core VM a 2-thread pool stalls whenever a neighbour holds a core; 0: "
                             "torch's default)")
    parser.add_argument("--workdir", type=Path, help="keep outputs here (default: a fresh tmp folder, removed)")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    images = args.images or (2000 if args.quick else 20000)
    loader_samples = args.loader_samples or (5000 if args.quick else 20000)
    repeats = args.repeats or (1 if args.quick else 5)
    sizes = tuple(int(x) for x in (args.rss_sizes or ("2000,20000" if args.quick else "10000,100000")).split(","))
    shard_mbs = [int(x) for x in args.rss_shard_mb.split(",")]

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"hardware": hardware(), "argv": sys.argv[1:]}
    print(f"hardware: {report['hardware']}")
    started = time.perf_counter()
    try:
        if "prepare" in sections:
            print(f"\n== 1. prepare throughput ({images} images -> 64x64x3)", flush=True)
            report["prepare"] = bench_prepare(work, images)
        if "loader" in sections:
            print(f"\n== 2. training-loader throughput (ShardStream, {loader_samples} samples)", flush=True)
            report["loader"] = bench_loader(work, loader_samples, args.loader_shard_mb, repeats,
                                            args.torch_threads or torch_default_threads())
        if "rss" in sections:
            print(f"\n== 3. peak RSS of the pretrain stage, {sizes[0]} vs {sizes[1]} images", flush=True)
            report["rss"] = bench_rss(work, sizes, shard_mbs, args.rss_big_cache_mb, args.torch_threads or None)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report["wall_time_s"] = round(time.perf_counter() - started, 1)
    print(f"\nload average at the end: {[round(x, 2) for x in os.getloadavg()]}; total {report['wall_time_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
