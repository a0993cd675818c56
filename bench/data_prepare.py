"""bench.data, section 1: `prepare` throughput on a generated ImageFolder, 1 worker vs all cores, and the
incremental re-run (unchanged files). Run it with `python -m bench.data --only prepare`."""
from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from bench.common import goal_met, quiet

CACHE = Path.home() / ".cache" / "pipeline"


# One in 20 of each kind, by index: mostly RGB JPEG (photos), then PNGs of every mode.
KINDS = ["jpeg_rgb"] * 10 + ["jpeg_exif"] + ["jpeg_l"] * 2 + ["png_rgb"] * 3 + ["png_rgba"] * 2 + ["png_l", "png_p"]


def _make_image(job: tuple[int, str]) -> int:
    """Image `index` (seeded): a smooth random picture, JPEG with a little noise (texture) or PNG."""
    from PIL import Image

    index, folder = job
    rng = np.random.default_rng([12, index])
    width, height = (int(x) for x in rng.integers(64, 641, 2))
    kind = KINDS[index % len(KINDS)]
    base = rng.integers(0, 256, (int(rng.integers(3, 10)), int(rng.integers(3, 10)), 4), dtype=np.uint8)
    image = Image.fromarray(base, "RGBA").resize((width, height), Image.Resampling.BICUBIC)
    path = Path(folder) / f"class{index % 10}" / f"{index:06d}.{'jpg' if kind.startswith('jpeg') else 'png'}"
    if kind.startswith("jpeg"):
        noise = rng.integers(-10, 11, (height, width, 1), dtype=np.int16)
        noisy = np.asarray(image.convert("RGB"), dtype=np.int16) + noise
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        if kind == "jpeg_l":
            image = image.convert("L")
        exif = Image.Exif()
        if kind == "jpeg_exif":
            exif[0x0112] = 6  # Orientation: rotate 90 CW to display (a phone's portrait shot)
        image.save(path, "JPEG", quality=90, exif=exif)
    else:
        mode = {"png_rgb": "RGB", "png_rgba": "RGBA", "png_l": "L"}.get(kind)
        image = image.convert(mode) if mode else image.convert("RGB").quantize(64)
        image.save(path, "PNG")
    return path.stat().st_size


def image_folder(count: int) -> tuple[Path, int]:
    """The generated ImageFolder of `count` images (cached) -> (path, total bytes)."""
    folder = CACHE / f"bench-imagefolder-{count // 1000}k"
    done = folder / ".complete"  # dot-files are not listed by the source scan
    if done.exists():
        return folder, int(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    for label in range(10):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"  generating {count} images into {folder} (once; cached) ...", flush=True)
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        total = sum(pool.imap_unordered(_make_image, [(i, str(folder)) for i in range(count)], chunksize=64))
    done.write_text(str(total))
    print(f"  generated in {time.perf_counter() - started:.0f} s", flush=True)
    return folder, total


def bench_prepare(work: Path, count: int) -> dict:
    from pipeline.params import load_config
    from pipeline.stages import prepare

    folder, nbytes = image_folder(count)
    workers_n = os.cpu_count() or 1
    print(f"  source: {count} images in 10 classes, {nbytes / 1e6:.0f} MB ({folder}); output 64x64x3; "
          f"page cache warm (the folder was read before)")

    def run(name: str, workers: int, cache: Path) -> dict:
        os.environ["PIPELINE_CACHE_DIR"] = str(cache)
        cfg = load_config(None, [f"data.source={folder}", "data.image_size=64", "data.channels=3",
                                 f"data.num_workers={workers}",
                                 f"paths.root={work / 'prepare' / re.sub(r'[^a-z0-9]+', '-', name)}"])
        with quiet():
            summary = prepare.run(cfg)
        print(f"  {name:<34}{summary['workers']:>8}{summary['decoded']:>9}{summary['reused']:>8}"
              f"{summary['wall_time_s']:>10.1f}{summary['images_per_s']:>11.0f}", flush=True)
        return summary

    previous = os.environ.get("PIPELINE_CACHE_DIR")
    print(f"  {'run':<34}{'workers':>8}{'decoded':>9}{'reused':>8}{'seconds':>10}{'images/s':>11}")
    try:
        one = run("1 worker, empty cache", 1, work / "cache-1")
        many = run(f"{workers_n} workers, empty cache", workers_n, work / "cache-n")
        again = run(f"{workers_n} workers, unchanged (incremental)", workers_n, work / "cache-n")
    finally:
        if previous is None:
            os.environ.pop("PIPELINE_CACHE_DIR", None)
        else:
            os.environ["PIPELINE_CACHE_DIR"] = previous
    speedup = many["images_per_s"] / one["images_per_s"]
    print(f"  RATIO {workers_n} workers / 1 worker: {speedup:.2f}x on {workers_n} cores "
          f"(ideal {workers_n}x: {speedup / workers_n:.0%} parallel efficiency)")
    print(f"  incremental re-run: decoded {again['decoded']} (goal 0: {goal_met(again['decoded'] == 0)}), "
          f"{again['images_per_s']:.0f} images/s = {again['images_per_s'] / many['images_per_s']:.1f}x the cold run")
    return {"images": count, "source_bytes": nbytes, "one_worker": one, "n_workers": many, "incremental": again,
            "speedup": speedup}
