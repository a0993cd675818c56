"""Where a training step's time goes: the pretrain stage's module, Lightning against a raw loop.

    python -m bench.profile_step [--batch 128] [--steps 200] [--out reports/profile-step.txt]

Times both loops (the same module, loader, optimizer and schedule as bench.gpu), then profiles
each with torch.profiler: host time by op, device kernels per step, and host-device
synchronisations, the usual reasons a small model's step costs more than its arithmetic.
Runs on the GPU when there is one, else on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import pretrain_classifier
from bench.gpu import DIGITS_SHAPE, REPO, glyph_data, lightning_throughput, torch_throughput
from pipeline.params import load_config
from pipeline.data.glyphs import GLYPHS

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="also write the full tables here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    on_gpu = torch.cuda.is_available()
    cfg = load_config(REPO / "params.yaml")
    trainer = cfg.trainer.model_copy(update={"accelerator": "gpu" if on_gpu else "cpu", "deterministic": False})
    stage_cfg = cfg.model_copy(update={"trainer": trainer})
    data = glyph_data(cfg, cfg.pretrain.glyphs_per_class)
    warmup = len(data.labels) // args.batch + 2  # past one whole epoch: every batch shape seen once

    def module():
        # No augmentation: the raw loop calls forward only, so both do the same work.
        return pretrain_classifier(stage_cfg, DIGITS_SHAPE, len(GLYPHS), warmup + args.steps, augment=False)

    def lit():
        return lightning_throughput("lightning", module(), data, stage_cfg, trainer, args.batch, warmup, args.steps)

    def raw():
        return torch_throughput("pytorch", module(), data, trainer, args.batch, warmup, args.steps)

    report = io.StringIO()
    for name, run in (("lightning", lit), ("pytorch", raw)):
        timed = run()
        step_ms = 1000 * timed.seconds / timed.steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        python = cProfile.Profile()
        with profile(activities=activities) as prof, contextlib.redirect_stdout(io.StringIO()):
            python.enable()
            run()
            python.disable()
        events = prof.key_averages()
        steps = warmup + args.steps
        syncs = {e.key: e.count for e in events if e.key in SYNCS}
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA") if on_gpu else 0
        print(f"{name:<10} {step_ms:7.2f} ms/step (timed, unprofiled); per step: {kernels / steps:6.1f} device kernels, "
              f"syncs/copies {({k: round(v / steps, 2) for k, v in syncs.items()})}", flush=True)
        report.write(f"\n===== {name}: {step_ms:.2f} ms/step, batch {args.batch}\n")
        report.write(events.table(sort_by="self_cpu_time_total", row_limit=25))
        stats = io.StringIO()
        pstats.Stats(python, stream=stats).sort_stats("tottime").print_stats(25)
        report.write(stats.getvalue())
    text = report.getvalue()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text[-6000:] if not args.out else f"tables in {args.out}")


if __name__ == "__main__":
    main()
