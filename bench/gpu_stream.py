"""Streaming shards vs in-memory tensors on a GPU: images/s of a pretrain-like Lightning fit.

    python -m bench.gpu_stream --out reports/gpu-stream.json   # one H100/H200: ~1-2 min (scripts/gpu-check.sh)
    python -m bench.gpu_stream --cpu --quick                    # CPU smoke run: tiny sizes, checks the code paths

Method. The pretrain stage's module (`Classifier`, augmentation on) with the `resnet` backbone
(ResNet-18 layout: width 64, blocks [2, 2, 2, 2]) on 3x224x224 images, 10 classes, batch 256,
bf16-mixed + channels_last, no torch.compile (its minutes of compile time would not fit the
lease; it makes the model faster, so the input pipeline's share larger), trained through
`pipeline.training.fit`, the driver every stage uses, on the same random pixels four ways:

- **GPU-resident**: synthetic tensors held on the GPU (`trainer.data_on_device`), batches
  gathered there: the model's own speed with no input pipeline, the upper bound.
- **host memory**: the same uint8 arrays held in host memory (`InMemorySplit`, the old design).
- **streamed**: the same images written as webdataset shards (data.shard_mb 64) on local disk
  and streamed by `ShardStream` with data.cache_mb=0 (every epoch reads the shards), read-ahead
  1 (trainer.num_workers=0, the default) and 4.

Images/s is timed from the end of a warm-up step to the last step, the device synchronised at
both ends; the runs span several epochs, so epoch boundaries (and the streamed runs' first shard
of each epoch) are inside the timed window. Goal: streamed >= 0.9x the GPU-resident run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.common import Stopwatch, hardware, pretrain_classifier, quiet
from bench.gpu import ThroughputProbe, peak_gpu_memory_gib
from pipeline.params import load_config
from pipeline.data.shards import Sample, SplitShards, samples_per_shard, write_split
from pipeline.data.stream import InMemorySplit
from pipeline.training import FitPlan, fit

GOAL = 0.9


def sizes(quick: bool) -> dict:
    if quick:
        return dict(image_size=32, images=1024, batch=64, warmup=4, steps=24, width=8, blocks=[1, 1], shard_mb=1)
    return dict(image_size=224, images=10240, batch=256, warmup=15, steps=100, width=64, blocks=[2, 2, 2, 2],
                shard_mb=64)


def make_shards(folder: Path, images: np.ndarray, labels: np.ndarray, shard_mb: int) -> SplitShards:
    per_shard = samples_per_shard(images.shape[1:], shard_mb)
    entries = write_split(folder, "train", (Sample(f"{i:08d}", images[i], int(labels[i])) for i in range(len(labels))),
                          per_shard)
    height, width, channels = images.shape[1:]
    return SplitShards(tuple(str(folder / e["name"]) for e in entries), tuple(e["samples"] for e in entries),
                       (channels, height, width))


def run(cpu: bool, quick: bool, out: Path | None) -> dict:
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*(LeafSpec|val_dataloader|num_workers|float32_matmul).*")
    on_gpu = torch.cuda.is_available() and not cpu
    if not on_gpu and not cpu:
        raise SystemExit("bench.gpu_stream: no CUDA device visible; use --cpu --quick for a CPU smoke run")
    size = sizes(quick)
    side = size["image_size"]
    cfg = load_config(None, [
        "pretrain.model.arch=resnet", f"pretrain.model.width={size['width']}",
        f"pretrain.model.blocks={size['blocks']}", f"pretrain.batch_size={size['batch']}",
        f"pretrain.checkpoint_every_n_steps={size['warmup'] + size['steps'] + 1}",
        f"data.image_size={side}", "data.channels=3", "data.cache_mb=0",
        f"trainer.accelerator={'gpu' if on_gpu else 'cpu'}", "trainer.deterministic=false",
        f"trainer.precision={'bf16-mixed' if on_gpu else '32-true'}", f"trainer.channels_last={str(on_gpu).lower()}",
        "trainer.log_every_n_steps=100000",
    ])
    report = {"hardware": hardware(), "sizes": size, "runs": {}}
    print(f"bench.gpu_stream on {report['hardware'].get('gpu', 'CPU')}: resnet width {size['width']} blocks "
          f"{size['blocks']}, {size['images']} images 3x{side}x{side}, batch {size['batch']}, "
          f"{size['warmup']} warm-up + {size['steps']} timed steps, {cfg.trainer.precision}", flush=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (size["images"], side, side, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size["images"]).astype(np.int64)
    work = Path(tempfile.mkdtemp(prefix="gpu-stream-"))
    try:
        began = time.perf_counter()
        shards = make_shards(work / "shards", images, labels, size["shard_mb"])
        print(f"  {len(shards.uris)} shards written in {time.perf_counter() - began:.1f} s", flush=True)
        cases = [
            ("GPU-resident synthetic tensors", InMemorySplit(images, labels), {"data_on_device": on_gpu}),
            ("host memory (InMemorySplit)", InMemorySplit(images, labels), {}),
            ("streamed shards, readahead 1", shards, {"num_workers": 0}),
            ("streamed shards, readahead 4", shards, {"num_workers": 4}),
        ]
        if not on_gpu:
            cases = cases[1:]  # no device to hold the data on
        total = size["warmup"] + size["steps"]
        for name, data, trainer_update in cases:
            trainer = cfg.trainer.model_copy(update=trainer_update)
            module = pretrain_classifier(cfg, (3, side, side), 10, total)
            probe = ThroughputProbe(size["warmup"], Stopwatch(cuda=on_gpu))
            peak_gpu_memory_gib()
            with tempfile.TemporaryDirectory() as checkpoints, quiet():
                fit(module, data, None, FitPlan(label=name, stage=cfg.pretrain, trainer=trainer, seed=cfg.seed,
                                                checkpoint_dir=checkpoints, total_steps=total, lr=module.hparams.lr,
                                                cache_mb=cfg.data.cache_mb, observers=(probe,)))
            rate = size["steps"] * size["batch"] / (probe.ended - probe.began)
            report["runs"][name] = {"images_per_s": round(rate, 1), "peak_memory_gib": peak_gpu_memory_gib()}
            print(f"  {name:<34}{rate:>10.0f} images/s", flush=True)
            if out:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    runs = {name: r["images_per_s"] for name, r in report["runs"].items()}
    reference = runs.get("GPU-resident synthetic tensors", runs["host memory (InMemorySplit)"])
    report["ratios"] = {}
    for name in ("streamed shards, readahead 1", "streamed shards, readahead 4"):
        ratio = runs[name] / reference
        report["ratios"][name] = round(ratio, 3)
        vs_host = runs[name] / runs["host memory (InMemorySplit)"]
        also = f"; vs host memory {vs_host:.3f}" if on_gpu else " (no GPU: host memory is the reference)"
        print(f"  RATIO {name} / {'GPU-resident' if on_gpu else 'host memory'}: {ratio:.3f} "
              f"(goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'}){also}")
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke run; use with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: 32 px, a small resnet, 24 timed steps")
    parser.add_argument("--out", type=Path, help="write the numbers here as JSON")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("webdataset") is None:  # the shard writer and reader need it
        print("bench.gpu_stream: skipped, webdataset is not installed (put its wheel and braceexpand's in .whl/)")
        return 1
    run(args.cpu, args.quick, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
