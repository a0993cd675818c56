"""Scheduled `retrain`: nothing to do while the data is unchanged; new images -> retrain and the gate decides."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.prefect_fixtures")
from tests.prefect_fixtures import STAGES, TINY, task_runs_of, write_digit_pngs  # noqa: E402

pytest_plugins = ["tests.prefect_fixtures"]
pytestmark = pytest.mark.slow


def test_retrain_skips_unchanged_data_and_retrains_when_images_are_added(flow_env, tmp_path: Path):
    from flows.parameters import TrainingParameters
    from flows.training import retrain

    source = tmp_path / "images"
    write_digit_pngs(source, classes=3, per_class=12)
    params = TrainingParameters(data_source=str(source), extra_overrides=TINY)

    # No champion yet: the first scheduled run trains, and its model becomes the champion.
    first = retrain(params)
    assert first["retrained"] is True
    assert first["stages"] == {stage: "ran" for stage in STAGES}
    assert first["promotion"]["promoted"] is True
    champion = flow_env.champion()
    assert champion["run"] == first["run"] and champion["data_version"] == first["data_version"]
    workspaces = flow_env.run_dirs()
    assert len(workspaces) == 1

    # Same images: nothing to do. No workspace, no task, no stage; the champion stays.
    state = retrain(params, return_state=True)
    second = state.result()
    assert second == {"retrained": False, "data_version": first["data_version"],
                      "corpus_version": first["data"]["corpus"]["version"]}
    assert flow_env.run_dirs() == workspaces, "an unchanged-data retrain created a workspace"
    assert task_runs_of(state.state_details.flow_run_id) == [], "an unchanged-data retrain ran tasks"
    assert flow_env.champion() == champion

    # New images in every class: a new data version, so retrain runs and the promotion gate decides.
    write_digit_pngs(source, classes=3, per_class=6, start=12)
    third = retrain(params)
    assert third["retrained"] is True
    assert third["data_version"] != first["data_version"]
    assert third["data"]["data_version"] == third["data_version"]
    assert third["stages"]["prepare"] == "ran"
    assert len(flow_env.run_dirs()) == 2
    decision = third["promotion"]
    # The gate compared both models on the new test set (same classes, so the champion is re-scored).
    assert decision["champion_run"] == first["run"]
    assert decision["champion_accuracy"] is not None
    assert "challenger" in decision["reason"] and "vs champion" in decision["reason"]
    expected_win = decision["challenger_accuracy"] > decision["champion_accuracy"] + decision["margin"]
    assert decision["promoted"] is expected_win
    now = flow_env.champion()
    if decision["promoted"]:
        assert now["run"] == third["run"] and now["data_version"] == third["data_version"]
    else:
        assert now == champion, "a challenger that did not win replaced the champion"
    # Every challenger is archived with its card, which records the decision.
    import json

    card = json.loads((Path(decision["release"]) / "model_card.json").read_text())
    assert card["promotion"]["promoted"] is decision["promoted"]
    assert card["promotion"]["reason"] == decision["reason"]
