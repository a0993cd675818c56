"""Orchestration overhead: the `train` flow against the four stages run directly.

    python -m bench.flow_overhead                       # demo params (params.yaml), ~minutes on a CPU
    python -m bench.flow_overhead --set pretrain.epochs=1 --repeats 2

Method. Everything runs in a fresh tmp folder: a copy of the project (dvc.yaml, params.yaml,
pipeline/), so the DVC cache and run-cache start empty, plus a fresh DVC remote and registry.
- direct: `python -m pipeline <stage>` for prepare, pretrain, finetune, evaluate, one subprocess
  after the other in a folder holding params.yaml; the sum of their wall times.
- flow: `train(force=True)` in this process, on Prefect's ephemeral server, which a trivial
  flow has already started (its start-up is reported on its own line): version the data, one
  task per stage (launch the same subprocess, stream its output into the Prefect logs, hash
  its outputs into DVC and record the run-cache), push outputs and run-cache to the remote,
  the promotion gate, the artifacts. `force` makes every stage run, so both sides compute
  the same things.
- ratio = flow / direct. With --repeats N the two alternate N times; medians are reported.
Then, on the flow's workspace: a no-op `dvc repro` (everything up to date), and `retrain`
with unchanged data, in process (server up, as under `make ui`) and as a cold process
(interpreter, imports and the ephemeral server's start-up included).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("prepare", "corpus", "pretrain", "finetune", "evaluate")
VENV_BIN = str(Path(sys.executable).parent)


def _copy_project(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", "params.yaml"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "pipeline", dest / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([VENV_BIN, env.get("PATH", "")])
    return env


def run_direct(workdir: Path, overrides: list[str]) -> dict[str, float]:
    """Each stage as its own `python -m pipeline <stage>` process; wall seconds per stage."""
    workdir.mkdir(parents=True)
    shutil.copy2(REPO / "params.yaml", workdir / "params.yaml")
    sets = [arg for override in overrides for arg in ("--set", override)]
    times = {}
    for stage in STAGES:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pipeline", stage, *sets], cwd=workdir, env=_env(),
                              capture_output=True, text=True)
        times[stage] = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{stage} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return times


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="flow-overhead-"))
    project = _copy_project(tmp / "project")
    from pipeline.params import update_params_file

    update_params_file(project / "params.yaml", [f"paths.runs={tmp / 'runs'}", f"paths.registry={tmp / 'registry'}",
                                                 f"paths.dvc_remote={tmp / 'dvc-remote'}"])
    os.environ.update(PIPELINE_PROJECT=str(project), PREFECT_HOME=str(tmp / "prefect-home"),
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
    os.environ["PATH"] = _env()["PATH"]
    from prefect import flow

    from flows.parameters import TrainingParameters
    from flows.training import retrain, train

    @flow
    def warm_up() -> None:
        return None

    server_start_s, _ = _timed(warm_up)
    direct_runs, flow_runs, result = [], [], None
    for i in range(args.repeats):
        direct_runs.append(run_direct(tmp / f"direct-{i}", args.overrides))
        seconds, result = _timed(train, TrainingParameters(force=True, extra_overrides=args.overrides))
        assert set(result["stages"].values()) == {"ran"}, result["stages"]
        flow_runs.append(seconds)

    workspace = Path(result["workspace"])
    noop_repro_s, done = _timed(subprocess.run, ["dvc", "repro"], cwd=workspace, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0 and "Running stage" not in done.stdout, done.stdout + done.stderr
    retrain_warm_s, skipped = _timed(retrain, TrainingParameters(extra_overrides=args.overrides))
    assert skipped["retrained"] is False, skipped
    code = ("from flows.parameters import TrainingParameters; from flows.training import retrain; "
            f"assert retrain(TrainingParameters(extra_overrides={args.overrides!r}))['retrained'] is False")
    cold_env = _env() | {"PREFECT_HOME": str(tmp / "prefect-home-cold")}
    retrain_cold_s, done = _timed(subprocess.run, [sys.executable, "-c", code], env=cold_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

    direct_s = statistics.median(sum(run.values()) for run in direct_runs)
    flow_s = statistics.median(flow_runs)
    numbers = {
        "overrides": args.overrides,
        "repeats": args.repeats,
        "direct_stage_s": {stage: round(statistics.median(run[stage] for run in direct_runs), 2) for stage in STAGES},
        "direct_total_s": round(direct_s, 2),
        "flow_s": round(flow_s, 2),
        "ratio": round(flow_s / direct_s, 3),
        "ephemeral_server_start_s": round(server_start_s, 2),
        "noop_dvc_repro_s": round(noop_repro_s, 2),
        "retrain_unchanged_in_process_s": round(retrain_warm_s, 2),
        "retrain_unchanged_cold_process_s": round(retrain_cold_s, 2),
        "cpu_count": os.cpu_count(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    for stage, seconds in numbers["direct_stage_s"].items():
        print(f"direct {stage:<9} {seconds:8.1f} s")
    print(f"direct total     {direct_s:8.1f} s")
    print(f"train flow       {flow_s:8.1f} s   ratio {flow_s / direct_s:.3f}x (goal <= 1.10x)")
    print(f"ephemeral server {server_start_s:8.1f} s   (start-up, once per process; not in the flow time)")
    print(f"no-op dvc repro  {noop_repro_s:8.1f} s")
    print(f"retrain, unchanged data: {retrain_warm_s:.1f} s in process, {retrain_cold_s:.1f} s as a cold process (goal < 15 s)")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
