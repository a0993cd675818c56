"""Cancelling a flow run through the Prefect API deletes its Kubernetes Job and pods.

A real Prefect server and the served `train` deployment (as `make ui` runs them) with
launcher=kubernetes against the API stand-in (reached through a kubeconfig, as in a
cluster). Artifacts and registry live on S3 (moto), as the Kubernetes launcher requires;
pods get the credentials from the `s3-credentials` Secret, as on a cluster. Once the
pretrain Job's pods train, the test cancels the run the way the UI's Cancel button does;
within 30 s no Job, pod or pod process may remain.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from kubernetes import client as k8s

from tests.integration.test_flow_ui import _settings, _wait_for_deployments
from tests.k8s_standin import k8s_standin  # noqa: F401  (pytest fixture)
from tests.prefect_fixtures import (
    PYTHON, REPO_ROOT, FlowEnv, copy_project, free_port, set_paths, start_prefect_server, stop,
)

pytest_plugins = ["tests.s3_fixtures"]
pytestmark = pytest.mark.slow

LONG_PRETRAIN = ["pretrain.epochs=30", "pretrain.glyphs_per_class=100", "pretrain.batch_size=32",
                 "pretrain.model.width=8", "pretrain.model.depth=1", "trainer.log_every_n_steps=1"]


def _wait(predicate, what: str, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_cancel_from_the_api_deletes_job_and_pods(k8s_standin, s3, tmp_path):  # noqa: F811
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    env = FlowEnv(tmp=tmp_path, project=copy_project(tmp_path / "project"), runs=tmp_path / "runs",
                  registry=tmp_path / "registry", remote=tmp_path / "dvc-remote")
    set_paths(env.project, runs=env.runs, registry=s3.uri("registry"), dvc_remote=env.remote)
    # The s3 fixture's keys, with moto's address as pods (in their own network) reach it.
    credentials = {**{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
                   **k8s_standin.lend_s3(s3.endpoint)}
    k8s.CoreV1Api(k8s_standin.api_client()).create_namespaced_secret("ml-pipeline", k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="s3-credentials"), string_data=credentials))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = start_prefect_server(tmp_path / "prefect-home", port, tmp_path / "server.log")
    serve_env = env.env() | {
        "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "KUBECONFIG": str(k8s_standin.write_kubeconfig(tmp_path / "kubeconfig")),
        "PIPELINE_K8S_CONFIG": json.dumps({"log_dir": str(tmp_path / "pod-logs"), "poll_seconds": 0.5,
                                           "termination_grace_seconds": 5}),
    }
    serving = subprocess.Popen([PYTHON, "-c", "from flows.serve import serve_deployments; serve_deployments()"],
                               cwd=REPO_ROOT, env=serve_env, stdout=(tmp_path / "serve.log").open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_deployments(api, ["train/train"], serving, tmp_path / "serve.log")
        params = {"launcher": "kubernetes", "extra_overrides": [*LONG_PRETRAIN, f"paths.root={s3.uri('art')}"]}
        with _settings(api):
            run = run_deployment("train/train", parameters={"params": params}, timeout=0)

            def pretrain_pods_running():
                return any(p["metadata"]["labels"].get("pipeline.example/stage") == "pretrain"
                           and p.get("status", {}).get("phase") == "Running" for p in k8s_standin.pods())

            _wait(pretrain_pods_running, "the pretrain pod to run", 240)
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(run.id, Cancelling())  # what the UI's Cancel button sends
            # The runner notices the cancel at its next poll, then the hook deletes the Job and waits out the pods.
            _wait(lambda: not k8s_standin.jobs() and not k8s_standin.pods(), "Job and pods to be deleted", 120)
            with get_client(sync_client=True) as client:
                _wait(lambda: client.read_flow_run(run.id).state.is_cancelled(), "the run to be Cancelled", 60)
        assert all(proc.poll() is not None for proc in k8s_standin.processes()), "a pod process outlived its pod"
        assert not s3.fs.exists(f"{s3.bucket}/art/models/pretrain/_COMPLETE")
    finally:
        stop(serving)
        stop(server)
