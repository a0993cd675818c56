"""scripts/gpu-check.sh, the one-call GPU check, in its CPU smoke mode: every step runs, one JSON sums them up,
and a failing step makes the whole call fail (whoever holds a GPU lease must not read a broken run as figures)."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PYTHON, REPO_ROOT, subprocess_env

SCRIPT = REPO_ROOT / "scripts" / "gpu-check.sh"


def _check(out, *stage_args: str) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run(["bash", str(SCRIPT), *stage_args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900, env=subprocess_env(SMOKE="1", OUT=str(out), PYTHON=PYTHON,
                                                          GPU_RUN_ROOT=str(out / "run")))
    return done, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_the_smoke_run_passes_every_step_and_writes_one_summary(tmp_path):
    done, summary = _check(tmp_path / "ok")
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary["ok"] is True
    assert [s["step"] for s in summary["steps"]] == ["bench-gpu", "gpu-stream", "stage-prepare", "stage-corpus",
                                                      "stage-pretrain", "stage-finetune", "stage-evaluate"]
    assert summary["bench-gpu"] and summary["gpu-stream"] and summary["stages_metrics"]["test"]["accuracy"] > 0


@pytest.mark.slow
def test_a_failing_stage_fails_the_call(tmp_path):
    done, summary = _check(tmp_path / "bad", "--set", "trainer.devices=0")  # exit 2 from the first stage
    assert done.returncode != 0, done.stdout
    assert summary["ok"] is False
    failed = [s for s in summary["steps"] if s["exit"] != 0]
    assert [(s["step"], s["exit"]) for s in failed] == [("stage-prepare", 2)]
    assert "stage-corpus" not in [s["step"] for s in summary["steps"]]  # nothing runs after a failure
