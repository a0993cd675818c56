"""CPU benchmarks (`make bench`): Lightning overhead, transfer speed, pipeline overhead.

    python -m bench.cpu                               # all three, params.yaml's demo config (< 10 min, 2 cores)
    python -m bench.cpu --json reports/bench-cpu.json # also keep the numbers
    python -m bench.cpu --skip-flow --parity-epochs 1 # quicker look

Each section prints its measured ratio next to its goal; method and recorded results are in
docs/benchmarks.md. Everything is written under a fresh tmp folder (or --workdir), never
into the repository's data/, models/ or checkpoints/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench import parity, transfer
from bench.common import hardware, quiet
import torch

from pipeline.config import Config
from pipeline.params import load_config
from pipeline.data.prepared import load_prepared
from pipeline.data.tasks import TaskArrays, to_tensor
from pipeline.stages import corpus, prepare, pretrain

REPO = Path(__file__).resolve().parent.parent
FLOW_OVERHEAD = REPO / "bench" / "flow_overhead.py"


def _goal(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def lightning_overhead(cfg: Config, epochs: int, repeats: int) -> dict:
    parity_cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"epochs": epochs})})
    corpus = load_prepared(cfg.paths.uri("corpus"), produced_by="corpus")  # what the pretrain stage trains on
    held = corpus.subset("train")
    train = TaskArrays(to_tensor(held.images), torch.from_numpy(held.labels), corpus.class_names)
    result = parity.measure(parity_cfg, train, corpus.image_shape, repeats=repeats)
    print(f"  {result.steps} steps x {repeats} alternating runs; per-step losses agree to 5 decimals "
          f"(max |diff| {result.max_loss_diff:.1e}, final loss {result.final_loss:.5f})")
    print(f"  wall time  Lightning {parity.median(result.lightning_s):7.2f} s   PyTorch {parity.median(result.torch_s):7.2f} s")
    print(f"  RATIO lightning/pytorch wall time {result.ratio:.3f}  (goal <= 1.05: {_goal(result.ratio <= 1.05)})")
    print(f"        steady-state step time ratio {result.step_ratio:.3f}  "
          f"({parity.median(result.lightning_step_s) * 1e3:.1f} vs {parity.median(result.torch_step_s) * 1e3:.1f} ms/step)")
    return result.as_dict()


def transfer_speed(cfg: Config, every: int) -> dict:
    result = transfer.measure(cfg, every=every)
    print(f"  target: scratch's final test accuracy {result.target_accuracy:.4f} "
          f"(after {result.total_steps} steps; probed every {every} step(s))")
    print(f"  scratch    reaches it at step {result.scratch[0]:4d} ({result.scratch[1]:.2f} s of training)")
    if result.finetuned is None:
        print("  finetuned  never reaches it")
        print("  RATIO finetuned/scratch steps n/a  (goal <= 0.333: NOT met)")
    else:
        print(f"  finetuned  reaches it at step {result.finetuned[0]:4d} ({result.finetuned[1]:.2f} s of training)")
        print(f"  RATIO finetuned/scratch steps {result.step_ratio:.3f}, seconds {result.time_ratio:.3f}  "
              f"(goal <= 0.333: {_goal(result.step_ratio <= 1 / 3)})")
    return result.as_dict()


def pipeline_overhead(overrides: list[str], timeout_s: float) -> dict | None:
    """The Prefect-vs-direct and no-op `dvc repro` numbers come from bench/flow_overhead.py, run as is."""
    if not FLOW_OVERHEAD.exists():
        print("  skipped: bench/flow_overhead.py is not in this checkout")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flow.json"
        cmd = [sys.executable, "-m", "bench.flow_overhead", "--json", str(out),
               *(arg for o in overrides for arg in ("--set", o))]
        print(f"  $ {' '.join(cmd[1:])}", flush=True)
        try:
            done = subprocess.run(cmd, cwd=REPO, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            print(f"  FAILED: timed out after {timeout_s:.0f} s")
            return {"error": "timeout"}
        for line in done.stdout.splitlines():
            print(f"  {line}")
        if done.returncode != 0 or not out.exists():
            print(f"  FAILED (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:] or ''}")
            return {"error": f"exit {done.returncode}"}
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="params.yaml override for every section (tests use tiny sizes)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--workdir", type=Path, help="where stage outputs go (default: a fresh tmp folder)")
    parser.add_argument("--parity-epochs", type=int, default=3, help="pretrain epochs per parity run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating Lightning/PyTorch runs")
    parser.add_argument("--probe-every", type=int, default=1, help="test-accuracy probe interval, in steps")
    parser.add_argument("--skip-flow", action="store_true", help="skip the pipeline overhead section")
    parser.add_argument("--flow-set", action="append", default=None, metavar="KEY.PATH=VALUE",
                        help="overrides for bench/flow_overhead.py (default: pretrain.epochs=1)")
    parser.add_argument("--flow-timeout", type=float, default=420)
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*(LeafSpec|val_dataloader|num_workers).*")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    cfg = load_config(args.params, [*args.overrides, f"paths.root={workdir}"])
    started = time.perf_counter()
    report: dict = {"hardware": hardware(), "overrides": args.overrides}
    print(f"bench.cpu: {report['hardware'].get('cpu_model')} x{os.cpu_count()}, torch threads "
          f"{report['hardware']['torch_threads']}, load average {report['hardware']['load_average']}; work in {workdir}")

    with quiet():
        prepare.run(cfg)
        corpus.run(cfg)
    print("\n[1/3] Lightning overhead: pretrain loop via pipeline.training.fit vs hand-written PyTorch", flush=True)
    report["lightning_overhead"] = lightning_overhead(cfg, args.parity_epochs, args.repeats)

    print("\n[2/3] Transfer speed: fine-tuned vs scratch, steps to scratch's final test accuracy", flush=True)
    pretrain_started = time.perf_counter()
    with quiet():
        summary = pretrain.run(cfg)
    print(f"  pretrain stage ({cfg.pretrain.objective}, {summary['steps']} steps): "
          f"{time.perf_counter() - pretrain_started:.1f} s, best source val/acc {summary['best_val_accuracy']:.4f}")
    report["pretrain"] = {"steps": summary["steps"], "wall_time_s": summary["wall_time_s"],
                          "best_val_accuracy": summary["best_val_accuracy"]}
    report["transfer_speed"] = transfer_speed(cfg, args.probe_every)

    print("\n[3/3] Pipeline overhead: Prefect flow vs stages called directly; no-op dvc repro", flush=True)
    if args.skip_flow:
        print("  skipped (--skip-flow)")
    else:
        report["pipeline_overhead"] = pipeline_overhead(args.flow_set or ["pretrain.epochs=1"], args.flow_timeout)

    report["total_s"] = round(time.perf_counter() - started, 1)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nbench.cpu done in {report['total_s']:.0f} s (load average now {report['load_average_after']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
