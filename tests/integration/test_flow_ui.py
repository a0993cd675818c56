"""End to end on a real Prefect server: `make ui`'s deployments, the Run button, the run page.

The module starts `prefect server start` (own PREFECT_HOME, free port on 127.0.0.1) and a
process serving `flows.serve.serve_deployments()` (the `train` and `retrain` deployments,
exactly as `make ui` does), then triggers `train` through the API with non-default
parameters, as the UI's Run button does. Headless Chromium then opens the run's page.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("tests.prefect_fixtures", "tests.integration.browser")
from tests.integration.browser import chromium_path, dump_dom, screenshot  # noqa: E402
from tests.prefect_fixtures import (  # noqa: E402
    PYTHON, REPO_ROOT, TINY, FlowEnv, artifacts_of, free_port, start_prefect_server, stop,
)

pytestmark = pytest.mark.slow

TEST_OUTPUT = REPO_ROOT / "test-output"
README_IMAGE = REPO_ROOT / "docs" / "img" / "prefect-ui-run.png"
RUN_PARAMETERS = {  # what a user would type into the Run form: none of these are params.yaml's values
    "labels_per_class": 3,
    "seed": 7,
    "pretrain_epochs": 1,
    "finetune_epochs": 2,
    "extra_overrides": [o for o in TINY if not o.startswith(("pretrain.epochs=", "finetune.epochs="))],
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(api url, ui url, FlowEnv): a real server plus the served deployments, torn down afterwards."""
    tmp = tmp_path_factory.mktemp("prefect-ui")
    env = FlowEnv.in_folder(tmp)
    port = free_port()
    ui, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    server = start_prefect_server(tmp / "prefect-home", port, tmp / "server.log")
    serving = None
    try:
        serving = subprocess.Popen(
            [PYTHON, "-c", "from flows.serve import serve_deployments; serve_deployments()"],
            cwd=REPO_ROOT, env=env.env() | {"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp / "prefect-home")},
            stdout=(tmp / "serve.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        _wait_for_deployments(api, ["train/train", "retrain/retrain"], serving, tmp / "serve.log")
        yield api, ui, env
    finally:
        if serving is not None:
            stop(serving)
        stop(server)
        for log in ("server.log", "serve.log"):
            if (tmp / log).exists():
                TEST_OUTPUT.mkdir(exist_ok=True)
                shutil.copy(tmp / log, TEST_OUTPUT / f"prefect-{log}")


def _settings(api: str):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: api})


def _wait_for_deployments(api: str, names: list[str], serving: subprocess.Popen, log: Path, timeout_s: float = 120):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with _settings(api), get_client(sync_client=True) as client:
        missing = list(names)
        while missing and time.monotonic() < deadline:
            assert serving.poll() is None, f"serve process exited:\n{log.read_text()[-3000:]}"
            try:
                client.read_deployment_by_name(missing[0])
                missing.pop(0)
            except ObjectNotFound:
                time.sleep(1)
    assert not missing, f"deployments {missing} not served within {timeout_s} s:\n{log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def ui_run(served):
    """Trigger `train` like the Run button: a flow run of the deployment with form parameters; wait for it."""
    from prefect.deployments import run_deployment

    api, _, _ = served
    with _settings(api):
        return run_deployment("train/train", parameters={"params": RUN_PARAMETERS}, timeout=600, poll_interval=2)


def test_train_deployment_triggered_through_the_api_completes_with_artifacts(served, ui_run):
    from prefect.client.orchestration import get_client

    api, _, env = served
    assert ui_run.state is not None and ui_run.state.is_completed(), ui_run.state
    with _settings(api):
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("train/train")
            retrain = client.read_deployment_by_name("retrain/retrain")
        artifacts = artifacts_of(ui_run.id)
    assert ui_run.deployment_id == deployment.id
    assert ui_run.parameters["params"]["seed"] == 7

    # The form's parameters overlaid params.yaml in the run's workspace.
    (workspace,) = env.run_dirs()
    effective = yaml.safe_load((workspace / "params.yaml").read_text())
    assert effective["seed"] == 7 and effective["finetune"]["labels_per_class"] == 3
    assert effective["pretrain"]["epochs"] == 1 and effective["pretrain"]["glyphs_per_class"] == 20

    assert artifacts["metrics"].type == "table"
    rows = artifacts["metrics"].data if isinstance(artifacts["metrics"].data, list) else yaml.safe_load(artifacts["metrics"].data)
    assert {row["model"] for row in rows} == {"fine-tuned", "scratch (same budget)"}
    assert all(0.0 <= row["test accuracy"] <= 1.0 for row in rows)
    assert artifacts["promotion"].type == "markdown"
    assert "transfer gain" in artifacts["promotion"].data
    assert "**promoted**: no champion yet" in artifacts["promotion"].data
    champion = env.champion()
    assert champion is not None and champion["release"].startswith(str(env.registry))
    assert (Path(champion["release"]) / "model_card.json").exists()

    # `retrain` is served on its cron schedule (weekly by default).
    assert [s.schedule.cron for s in retrain.schedules] == ["0 3 * * 1"]


def test_browser_shows_the_run_completed(served, ui_run):
    browser = chromium_path()
    if browser is None:
        pytest.skip("Chromium not installed: run scripts/ensure-chromium.sh (CI does) to enable this test")
    _, ui, _ = served
    page = f"{ui}/runs/flow-run/{ui_run.id}"

    dom = dump_dom(browser, page, wait_for=[ui_run.name, "state-badge state--"])
    TEST_OUTPUT.mkdir(exist_ok=True)
    (TEST_OUTPUT / "prefect-run.html").write_text(dom)

    assert ui_run.name in dom, "the run page did not render the run"
    # The page header's state badge (log lines also say "Completed()", so look for the badge itself).
    badges = re.findall(r'<span class="[^"]*\bstate-badge state--(\w+)"[^>]*>.*?<span>(\w+)</span>', dom)
    assert badges == [("completed", "Completed")], f"run page state badge(s): {badges}"
    TEST_OUTPUT.mkdir(exist_ok=True)
    shot = screenshot(browser, page, TEST_OUTPUT / "prefect-run.png")
    assert shot.stat().st_size > 10_000, "screenshot is (nearly) empty"
    if not README_IMAGE.exists() or os.environ.get("PIPELINE_UPDATE_SCREENSHOT") == "1":
        # The README's picture: refreshed on request only, so a test run leaves the checkout clean.
        README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, README_IMAGE)


RUN_PAGE_IMAGE = REPO_ROOT / "docs" / "ui-run-page.png"


def test_browser_shows_progress_and_curves_artifacts(served, ui_run):
    """The UI shows each training stage's progress bar, on that stage's task run, and the curves (flows/progress.py);
    a screenshot of the run page (graph of the stage chain, logs) goes to docs/ui-run-page.png."""
    browser = chromium_path()
    if browser is None:
        pytest.skip("Chromium not installed: run scripts/ensure-chromium.sh (CI does) to enable this test")
    api, ui, env = served
    with _settings(api):
        keys = set(artifacts_of(ui_run.id))
    assert {"progress-pretrain", "progress-finetune", "progress-pretrain-detail", "progress-finetune-detail"} <= keys
    (workspace,) = env.run_dirs()
    wanted = ["progress-pretrain", "progress-finetune"]
    if (workspace / "models" / "release" / "curves.json").exists():
        assert "curves" in keys
        wanted.append("curves")
    # Each artifact's page in the UI names the run (and, for progress, the stage task run) it came from.
    # (The run page's Artifacts tab is not reachable by URL in this UI: `?tab=` is not honoured on load.)
    TEST_OUTPUT.mkdir(exist_ok=True)
    for key in wanted:
        dom = dump_dom(browser, f"{ui}/artifacts/key/{key}", wait_for=[key, ui_run.name])
        (TEST_OUTPUT / f"prefect-artifact-{key}.html").write_text(dom)
        assert key in dom and ui_run.name in dom, f"the UI's page of artifact {key} does not show run {ui_run.name}"
        if key.startswith("progress-"):
            assert f"run_stage:{key.removeprefix('progress-')}" in dom, f"{key}: not shown on its stage's task run"
    shot = screenshot(browser, f"{ui}/runs/flow-run/{ui_run.id}", TEST_OUTPUT / "prefect-run-page.png")
    assert shot.stat().st_size > 10_000, "screenshot is (nearly) empty"
    if not RUN_PAGE_IMAGE.exists() or os.environ.get("PIPELINE_UPDATE_SCREENSHOT") == "1":
        RUN_PAGE_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, RUN_PAGE_IMAGE)
