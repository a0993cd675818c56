"""Facts about a run, as opposed to what it computed: timings, reused work, hosts, dates, hardware, commit.

A stage's DVC output must be a pure function of code, params and data (byte-identical when recomputed,
so DVC's cache and the flows' stage cache hit on unchanged work anywhere). So none of these facts go
into it: each stage writes them to its *run report*, `<paths.root>/reports/usage/<stage>.json`, which no stage
lists as an output or a dependency. `evaluate` gathers them (with hardware, git commit and date) into
`usage/evaluate.json`, what the model card shows once merged (pipeline/model_card.py `with_run_report`).
A stage restored from a cache computed nothing here and writes no report.
"""
from __future__ import annotations

import os
import platform
import subprocess
import time


USAGE_DIR = "usage"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("PIPELINE_GIT_COMMIT")  # set in the image, which has no .git


def hardware() -> dict:
    import torch  # here: the flows read run reports (read_usage) without importing torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    return info


def usage_uri(cfg, stage: str) -> str:
    """Where `stage` reports its run (local path or URI): `<paths.root>/reports/usage/<stage>.json`, never inside
    a stage output. Under `paths.root` itself, not `paths.reports`: the flows' stage cache points each stage's
    outputs (evaluate's `reports` too) at a folder of their own, and evaluate must find every stage's report."""
    from pipeline import storage

    root = cfg.paths.root
    base = "reports" if root in ("", ".") else storage.join(root, "reports")
    return storage.join(base, USAGE_DIR, f"{stage}.json")


def write_usage(cfg, stage: str, usage: dict) -> dict:
    """Write `usage` (plus host and finish time) as the stage's run report -> what was written.

    A report that cannot be written costs one warning line, never the stage: its outputs are complete."""
    from pipeline import storage

    report = {"stage": stage, **usage, "host": platform.node(),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    uri = usage_uri(cfg, stage)
    try:
        storage.write_json(uri, report)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        print(f"[{stage}] warning: run report not written to {uri} ({type(exc).__name__}: {exc})", flush=True)
    return report


def read_usage(cfg, stage: str) -> dict | None:
    """A stage's run report, or None (restored from a cache, or run before reports existed)."""
    from pipeline import storage

    uri = usage_uri(cfg, stage)
    try:
        return storage.read_json(uri) if storage.exists(uri) else None
    except Exception:  # noqa: BLE001 - a damaged report is a missing one
        return None
