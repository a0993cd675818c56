"""One content-addressed cache for the flow and `dvc repro`: DVC's run-cache on the shared remote.

A flow run pushes its outputs and run-cache entries; a clean clone's `dvc repro --pull` then
restores every stage instead of recomputing it. And the other way round: what a clean
clone's `dvc repro` + `dvc push --run-cache` computed, a flow run restores.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("tests.prefect_fixtures")
from tests.prefect_fixtures import STAGES, TINY, FlowEnv, tool_env  # noqa: E402

pytest_plugins = ["tests.prefect_fixtures"]
pytestmark = pytest.mark.slow

STAGE_OUTPUT_MARKERS = ("[prepare] ", "[pretrain] ", "[finetune] ", "[evaluate] ")  # what stage processes print


def _dvc(clone: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(["dvc", *args], cwd=clone, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"dvc {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def _clean_clone(dest: Path, env: FlowEnv, params: dict) -> Path:
    """What a colleague's fresh checkout looks like: dvc.yaml, the code, params; own cache; same remote."""
    dest.mkdir(parents=True)
    shutil.copy2(env.project / "dvc.yaml", dest / "dvc.yaml")
    shutil.copytree(env.project / "pipeline", dest / "pipeline")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc(dest, "init", "--no-scm")
    _dvc(dest, "remote", "add", "--default", "shared", str(env.remote))
    return dest


def test_flow_outputs_restore_in_a_clean_clone_without_recomputing(flow_env, tmp_path: Path):
    from flows.parameters import TrainingParameters
    from flows.training import train

    result = train(TrainingParameters(seed=11, extra_overrides=TINY))
    assert result["stages"] == {stage: "ran" for stage in STAGES}
    params = yaml.safe_load((Path(result["workspace"]) / "params.yaml").read_text())

    clone = _clean_clone(tmp_path / "clone", flow_env, params)
    done = _dvc(clone, "repro", "--pull")

    output = done.stdout + done.stderr
    for stage in STAGES:
        assert f"Stage '{stage}' is cached - skipping run" in output, output
    assert "Running stage" not in output, output
    assert not [line for line in output.splitlines() if line.startswith(STAGE_OUTPUT_MARKERS)], output
    restored = json.loads((clone / "reports" / "metrics.json").read_text())
    assert restored == result["metrics"]
    assert (clone / "models" / "release").is_dir()
    # And now the clone is simply up to date.
    assert "Data and pipelines are up to date" in _dvc(clone, "status").stdout


def test_dvc_repro_in_a_clean_clone_is_restored_by_the_flow(flow_env, tmp_path: Path):
    from flows.parameters import TrainingParameters
    from flows.training import train
    from pipeline.params import apply_overrides, read_params

    overrides = [*TINY, "seed=12"]
    params = apply_overrides(read_params(flow_env.project / "params.yaml"), overrides)
    clone = _clean_clone(tmp_path / "clone", flow_env, params)
    done = _dvc(clone, "repro")
    assert all(f"Running stage '{stage}'" in done.stdout for stage in STAGES), done.stdout
    _dvc(clone, "push", "--run-cache")

    result = train(TrainingParameters(extra_overrides=overrides))

    assert result["stages"] == {stage: "run-cache" for stage in STAGES}
    assert result["metrics"] == json.loads((clone / "reports" / "metrics.json").read_text())
    workspace = Path(result["workspace"])
    assert (workspace / "models" / "release").is_dir()
    assert (workspace / "dvc.lock").exists()


def test_two_forced_computations_leave_one_cache_a_clean_clone_restores_whole(flow_env, tmp_path: Path):
    """Two independent computations of every stage (force) push identical outputs, because stage outputs
    are a pure function of code, params and data: whichever a colleague's clone restores, every downstream
    stage's cache key matches and all five stages are restored, none recomputed."""
    from flows.parameters import TrainingParameters
    from flows.training import train

    first = train(TrainingParameters(seed=13, force=True, extra_overrides=TINY))
    second = train(TrainingParameters(seed=13, force=True, extra_overrides=TINY))
    assert first["stages"] == second["stages"] == {stage: "ran" for stage in STAGES}
    assert first["metrics"] == second["metrics"]
    params = yaml.safe_load((Path(second["workspace"]) / "params.yaml").read_text())

    clone = _clean_clone(tmp_path / "clone", flow_env, params)
    output = "\n".join(_dvc(clone, "repro", "--pull").stdout.splitlines())
    assert [stage for stage in STAGES if f"Stage '{stage}' is cached - skipping run" in output] == list(STAGES), output
    assert "Running stage" not in output, output
