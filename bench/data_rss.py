"""bench.data, section 3: peak RSS of the pretrain stage at two corpus sizes, streamed and held in memory.
Run it with `python -m bench.data --only rss`."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import goal_met

REPO = Path(__file__).resolve().parent.parent
# One wrapper process per measurement: its RUSAGE_CHILDREN peak is the stage's alone.
RSS_WRAPPER = ("import resource, subprocess, sys\n"
               "code = subprocess.run(sys.argv[1:]).returncode\n"
               "print('child_maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
               "sys.exit(code)\n")


def write_corpus(uri: Path, count: int, shard_mb: int, seed: int = 0) -> None:
    """A corpus as `corpus` would publish it: shards of 32x32x3 images, manifest, _COMPLETE marker."""
    from pipeline import storage

    if (uri / "_COMPLETE").exists():
        return
    val = count // 10
    with storage.staged_output(str(uri)) as out:
        shards = {}
        for split, n, offset in (("train", count - val, 0), ("val", val, count - val)):
            rng = np.random.default_rng([seed, offset])
            # Written in blocks: the writer never holds the whole corpus either.
            def samples():
                from pipeline.data.shards import Sample
                for start in range(0, n, 4096):
                    block = rng.integers(0, 256, (min(4096, n - start), 32, 32, 3), dtype=np.uint8)
                    labels = rng.integers(0, 10, len(block))
                    for i in range(len(block)):
                        yield Sample(f"{offset + start + i:08d}", block[i], int(labels[i]))
            from pipeline.data.shards import samples_per_shard, write_split
            shards[split] = write_split(out, split, samples(), samples_per_shard((32, 32, 3), shard_mb))
        storage.write_json(str(out / "manifest.json"), {
            "data_version": f"bench{count}-{shard_mb}mb-000000", "source": "bench:random",
            "classes": [f"c{i}" for i in range(10)], "image_shape": [32, 32, 3], "files": [], "shards": shards,
        })


def _peak_rss(command: list[str], log: Path, threads: int | None = None) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of `command` run by a fresh wrapper process."""
    started = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    result = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *command], cwd=REPO, capture_output=True, text=True,
                            env=env)
    seconds = time.perf_counter() - started
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}; see {log}:\n{result.stderr[-2000:]}")
    found = re.findall(r"child_maxrss_kib (\d+)", result.stdout)
    return int(found[-1]) * 1024, seconds


def bench_rss(work: Path, sizes: tuple[int, int], shard_mbs: list[int], big_cache_mb: int,
              threads: int | None) -> dict:
    params = work / "empty-params.yaml"
    params.write_text("{}\n")  # defaults + the overrides below; not the repository's params.yaml
    base = [sys.executable, "-m", "pipeline", "pretrain", "--params", str(params),
            "--set", "pretrain.epochs=1", "--set", "pretrain.model.width=8", "--set", "pretrain.model.depth=1",
            "--set", "pretrain.batch_size=256", "--set", "pretrain.checkpoint_every_n_steps=1000000",
            "--set", "data.image_size=32", "--set", "data.channels=3", "--set", "trainer.log_every_n_steps=1000"]
    idle, _ = _peak_rss([sys.executable, "-c", "import pipeline.stages.pretrain, pipeline.training"],
                        work / "rss-imports.log")
    print(f"  process with torch + lightning + the stage imported, nothing run: {idle / 2**20:.0f} MiB")
    print(f"  {'corpus (train/val 90/10)':<28}{'shard_mb':>9}{'shards':>7}{'cache_mb':>9}{'peak RSS':>10}"
          f"{'over idle':>10}{'seconds':>9}")
    results = []
    for shard_mb in shard_mbs:
        for cache_mb in (0, big_cache_mb):
            for count in sizes:
                corpus = work / "corpora" / f"n{count}-{shard_mb}mb"
                write_corpus(corpus, count, shard_mb)
                manifest = json.loads((corpus / "manifest.json").read_text())
                shard_count = sum(len(v) for v in manifest["shards"].values())
                root = work / "rss-runs" / f"n{count}-{shard_mb}mb-cache{cache_mb}"
                rss, seconds = _peak_rss(
                    base + ["--set", f"paths.corpus={corpus}", "--set", f"paths.root={root}",
                            "--set", f"data.cache_mb={cache_mb}"],
                    work / f"rss-n{count}-{shard_mb}mb-cache{cache_mb}.log", threads)
                shutil.rmtree(root, ignore_errors=True)
                results.append({"images": count, "shard_mb": shard_mb, "shards": shard_count, "cache_mb": cache_mb,
                                "peak_rss_bytes": rss, "seconds": round(seconds, 1)})
                print(f"  {count:>8} images 32x32x3{'':<6}{shard_mb:>9}{shard_count:>7}{cache_mb:>9}"
                      f"{rss / 2**20:>7.0f} MiB{(rss - idle) / 2**20:>6.0f} MiB{seconds:>9.0f}", flush=True)
    small, large = sizes
    ratios = {}
    for shard_mb in shard_mbs:
        for cache_mb in (0, big_cache_mb):
            pick = {r["images"]: r["peak_rss_bytes"] for r in results
                    if r["shard_mb"] == shard_mb and r["cache_mb"] == cache_mb}
            ratio = pick[large] / pick[small]
            ratios[f"shard_mb={shard_mb} cache_mb={cache_mb}"] = ratio
            note = f"(goal <= 1.2x: {goal_met(ratio <= 1.2)})" if cache_mb == 0 else "(held in memory: the old design)"
            print(f"  RATIO peak RSS {large // 1000}k / {small // 1000}k, shard_mb={shard_mb}, cache_mb={cache_mb}: "
                  f"{ratio:.2f}x {note}")
    return {"idle_rss_bytes": idle, "runs": results, "ratios": ratios}
