"""`pipeline run` (what `make run` calls): the train flow on an embedded, ephemeral Prefect server."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.prefect_fixtures")
from tests.prefect_fixtures import STAGES, TINY, VENV_BIN, FlowEnv  # noqa: E402

pytestmark = pytest.mark.slow


def _flow_env(tmp: Path) -> FlowEnv:
    return FlowEnv.in_folder(tmp)


def _pipeline_run(env: FlowEnv, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # cwd is the project (its params.yaml is what `pipeline run` uses); a fresh PREFECT_HOME means
    # nothing but the embedded server can answer.
    return subprocess.run(
        [f"{VENV_BIN}/pipeline", "run", *args], cwd=env.project, capture_output=True, text=True, timeout=timeout,
        env=env.env() | {"PREFECT_HOME": str(env.tmp / "prefect-home"), "COLUMNS": "200"},
    )


def test_pipeline_run_completes_on_the_ephemeral_server_and_prints_the_summary(tmp_path: Path):
    env = _flow_env(tmp_path)
    sets = [arg for override in TINY for arg in ("--set", override)]

    done = _pipeline_run(env, *sets)

    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "Starting temporary server" in output  # the embedded server; nobody started one
    (workspace,) = env.run_dirs()
    summary = done.stdout[done.stdout.index(f"pipeline run {workspace.name}"):]
    for stage in STAGES:
        assert re.search(rf"stage {stage}\s+│ ran\s", summary), summary
    metrics = json.loads((workspace / "reports" / "metrics.json").read_text())
    assert f"{metrics['test']['accuracy']:.4f}" in summary
    assert f"{metrics['transfer_gain']:+.4f}" in summary
    assert "PROMOTED: no champion yet" in summary
    assert env.champion()["run"] == workspace.name
    assert str(workspace) in summary


def test_pipeline_run_with_a_bad_param_exits_2_naming_the_key_before_any_work(tmp_path: Path):
    env = _flow_env(tmp_path)

    done = _pipeline_run(env, "--set", "pretrain.optimizer.lr=-1", "--set", "finetune.epochs=zero", timeout=120)

    assert done.returncode == 2, done.stdout + done.stderr
    assert "pretrain.optimizer.lr" in done.stderr and "finetune.epochs" in done.stderr
    assert env.run_dirs() == []
