"""Fixtures for the Prefect flow tests (tests/integration/test_flow_*.py).

Register with `pytest_plugins = ["tests.prefect_fixtures"]` in a test module.

Every flow test works on a *copy* of the project (dvc.yaml, params.yaml, pipeline/) in a tmp
folder: the per-run workspaces share `<project>/.dvc/cache`, so a copy gives each test a cold,
private DVC cache and run-cache, and nothing is written into this checkout's cache, runs/ or
registry/. The DVC remote, the runs folder and the registry are tmp folders too.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest

from pipeline.localserver import ServerNotReady, free_port, wait_until_answers
from tests.conftest import TINY as STAGE_TINY

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
VENV_BIN = str(Path(PYTHON).parent)

# The whole pipeline in ~30 s on a 2-core CPU, every code path still exercised.
TINY = [o for o in STAGE_TINY if not o.startswith("finetune.labels_per_class=")]  # the flow tests set budgets
STAGES = ("prepare", "corpus", "pretrain", "finetune", "evaluate")
QUIET_PREFECT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry writes racing the SQLite db
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
}



def copy_project(dest: Path) -> Path:
    """The files a flow workspace is made from, and nothing else (no .dvc cache, runs, registry)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", "params.yaml"):
        if (REPO_ROOT / name).exists():
            shutil.copy2(REPO_ROOT / name, dest / name)
    shutil.copytree(REPO_ROOT / "pipeline", dest / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def set_paths(project: Path, **paths) -> None:
    """Write `paths.<key>: value` into a project copy's params.yaml (where the flow reads them)."""
    from pipeline.params import update_params_file

    update_params_file(project / "params.yaml", [f"paths.{key}={value}" for key, value in paths.items()])


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this venv's python/dvc first, this checkout importable."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([VENV_BIN, env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(QUIET_PREFECT)
    env.update(extra)
    return env


def write_digit_pngs(root: Path, classes: int = 3, per_class: int = 12, start: int = 0) -> list[Path]:
    """sklearn's real 8x8 digits as grayscale PNGs in ImageFolder layout: <root>/digit<k>/<i>.png."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    written = []
    for label in range(classes):
        chosen = np.flatnonzero(digits.target == label)[start:start + per_class]
        assert len(chosen) == per_class, "not enough sklearn digits for this class"
        for i, index in enumerate(chosen, start=start):
            path = root / f"digit{label}" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(digits.images[index] * (255 / 16)).astype(np.uint8)).save(path)
            written.append(path)
    return written


@dataclass
class FlowEnv:
    """Where a flow test's runs go; `flows.training` is already pointed at these folders."""
    tmp: Path
    project: Path
    runs: Path
    registry: Path
    remote: Path

    @classmethod
    def in_folder(cls, tmp: Path) -> "FlowEnv":
        """A project copy whose params.yaml puts runs, registry and DVC remote under `tmp`."""
        env = cls(tmp=tmp, project=copy_project(tmp / "project"), runs=tmp / "runs", registry=tmp / "registry",
                  remote=tmp / "dvc-remote")
        set_paths(env.project, runs=env.runs, registry=env.registry, dvc_remote=env.remote)
        return env

    def run_dirs(self) -> list[Path]:
        if not self.runs.exists():
            return []
        return sorted(p for p in self.runs.iterdir() if p.is_dir() and not p.is_symlink())

    def champion(self) -> dict | None:
        import json

        pointer = self.registry / "champion.json"
        return json.loads(pointer.read_text()) if pointer.exists() else None

    def env(self) -> dict[str, str]:
        """The same project for a subprocess (its params.yaml names the runs, registry and remote)."""
        return tool_env(PIPELINE_PROJECT=str(self.project))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite in a tmp dir) for the in-process flow runs of a session."""
    from prefect.testing.utilities import prefect_test_harness

    previous = {key: os.environ.get(key) for key in QUIET_PREFECT}
    os.environ.update(QUIET_PREFECT)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def flow_env(tmp_path: Path, monkeypatch, prefect_harness) -> FlowEnv:
    """A private project copy whose params.yaml puts runs, registry and DVC remote in tmp folders."""
    env = FlowEnv.in_folder(tmp_path)
    monkeypatch.setenv("PIPELINE_PROJECT", str(env.project))
    # dvc.yaml's `cmd: python -m pipeline ...` and the stage launcher must find this venv's python.
    monkeypatch.setenv("PATH", os.pathsep.join([VENV_BIN, os.environ.get("PATH", "")]))
    return env


def prefect_client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def task_runs_of(flow_run_id: UUID | str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with prefect_client() as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))])))


def logs_of(flow_run_id: UUID | str, settle_s: float = 3.0) -> list:
    """The flow run's log records (logs are shipped to the API in batches: give them a moment)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    time.sleep(settle_s)
    wanted = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(str(flow_run_id))]))
    logs: list = []
    with prefect_client() as client:
        while page := client.read_logs(log_filter=wanted, limit=200, offset=len(logs)):
            logs.extend(page)
    return logs


def artifacts_of(flow_run_id: UUID | str) -> dict[str, object]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with prefect_client() as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))])))
    return {artifact.key: artifact for artifact in found}


def start_prefect_server(home: Path, port: int, log: Path, timeout_s: float = 180) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:<port> with its own PREFECT_HOME; returns once /api/health answers."""
    home.mkdir(parents=True, exist_ok=True)
    env = tool_env(PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
                   PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    server = subprocess.Popen([PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_answers(server, f"http://127.0.0.1:{port}/api/health", timeout_s)
    except ServerNotReady as exc:
        stop(server)
        raise RuntimeError(f"prefect server {exc}:\n{log.read_text()[-3000:]}") from None
    return server


def stop(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group we started, then SIGKILL if it lingers."""
    import signal

    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    except ProcessLookupError:
        pass
