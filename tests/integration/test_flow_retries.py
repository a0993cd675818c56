"""Retries are for infrastructure faults only.

A stage that crashes once (exit 1, like a lost node) is retried and the flow completes; a bad
param fails the flow before any work with the exit-2 message; bad data that gets past config
validation makes the stage exit 2, and that stage is not retried.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.prefect_fixtures")
from tests.prefect_fixtures import STAGES, TINY, logs_of, task_runs_of, write_digit_pngs  # noqa: E402

pytest_plugins = ["tests.prefect_fixtures"]
pytestmark = pytest.mark.slow


def _train(params):
    from flows.training import train

    return train(params, return_state=True)


def test_infrastructure_fault_is_retried_and_the_flow_completes(flow_env, tmp_path: Path, monkeypatch):
    from flows.parameters import TrainingParameters

    marker = tmp_path / "pretrain-fault-fired"
    monkeypatch.setenv("PIPELINE_INJECT_FAULT", f"pretrain:{marker}")

    state = _train(TrainingParameters(extra_overrides=TINY))

    assert state.is_completed(), state
    result = state.result()
    assert marker.read_text() == "fired\n", "the injected fault never fired"
    assert result["stages"] == {stage: "ran" for stage in STAGES}
    runs = task_runs_of(state.state_details.flow_run_id)
    stage_runs = [run for run in runs if run.name.startswith("run_stage")]
    assert len(stage_runs) == len(STAGES)
    assert all(run.state.is_completed() for run in stage_runs)
    # Exactly one stage task needed a second attempt: pretrain, the one with the fault.
    assert sorted(run.run_count for run in stage_runs) == [1] * (len(STAGES) - 1) + [2]
    retried = next(run for run in stage_runs if run.run_count == 2)
    retried_logs = [log.message for log in logs_of(state.state_details.flow_run_id) if log.task_run_id == retried.id]
    assert any("injected infrastructure fault" in line for line in retried_logs)
    assert any(line.startswith("pretrain: ran in") for line in retried_logs)


def test_bad_param_fails_once_with_the_exit_2_message_before_any_work(flow_env):
    from flows.parameters import TrainingParameters
    from pipeline.errors import ConfigError

    state = _train(TrainingParameters(extra_overrides=[*TINY, "pretrain.optimizer.lr=-1"]))

    assert state.is_failed(), state
    with pytest.raises(ConfigError) as failure:
        state.result()
    assert "pretrain.optimizer.lr" in failure.value.render()
    assert flow_env.run_dirs() == [], "a workspace was created for an invalid config"
    assert task_runs_of(state.state_details.flow_run_id) == [], "a task ran for an invalid config"
    from tests.prefect_fixtures import prefect_client

    with prefect_client() as client:
        assert client.read_flow_run(state.state_details.flow_run_id).run_count == 1


def test_bad_data_makes_the_stage_exit_2_and_it_is_not_retried(flow_env, tmp_path: Path):
    """A truncated image passes listing and versioning (its header and hash are fine); `prepare`, which
    decodes it, rejects it with exit 2."""
    from flows.parameters import TrainingParameters
    from flows.stage_task import StageInputError

    source = tmp_path / "images"
    write_digit_pngs(source, classes=3, per_class=6)
    truncated = sorted((source / "digit2").iterdir())[0]
    truncated.write_bytes(truncated.read_bytes()[:60])  # the PNG header survives, the pixels do not

    state = _train(TrainingParameters(data_source=str(source), extra_overrides=TINY))

    assert state.is_failed(), state
    with pytest.raises(StageInputError, match="prepare exited 2"):
        state.result()
    stage_runs = {run.name.split(":", 1)[1]: run for run in task_runs_of(state.state_details.flow_run_id)
                  if run.name.startswith("run_stage")}
    # corpus reads nothing of prepare's, so it runs beside it (and pretrain after it, if corpus ends first); what
    # reads prepare's output never starts, and nothing starts once prepare has failed.
    prepare = stage_runs["prepare"]
    started = {name: run for name, run in stage_runs.items() if run.run_count}
    assert "prepare" in started and not {"finetune", "evaluate"} & set(started), f"ran: {sorted(started)}"
    if "pretrain" in started:  # submitted only if corpus had succeeded before prepare failed
        assert stage_runs["corpus"].end_time <= prepare.end_time, "a stage was submitted after the failure"
    assert prepare.run_count == 1, "an exit-2 stage was retried"
    assert prepare.state.is_failed()
    stage_lines = [log.message for log in logs_of(state.state_details.flow_run_id) if log.task_run_id == prepare.id]
    # The stage process ran, and complained, exactly once.
    assert sum(line.startswith("error:") for line in stage_lines) == 1, stage_lines
    assert sum(f"digit2/{truncated.name}" in line for line in stage_lines) == 1, stage_lines
    (workspace,) = flow_env.run_dirs()
    assert not (workspace / "data" / "prepared").exists(), "partial outputs left behind"


def test_corrupt_image_fails_at_data_versioning_naming_the_file(flow_env, tmp_path: Path):
    from flows.parameters import TrainingParameters
    from pipeline.errors import DataError

    source = tmp_path / "images"
    write_digit_pngs(source, classes=3, per_class=4)
    (source / "digit1" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    state = _train(TrainingParameters(data_source=str(source), extra_overrides=TINY))

    assert state.is_failed(), state
    with pytest.raises(DataError) as failure:
        state.result()
    assert "digit1/001.png" in failure.value.render()
    assert not [run for run in task_runs_of(state.state_details.flow_run_id) if run.name.startswith("run_stage")]
