"""A flow run on Kubernetes first stops its own previous attempt's stage Jobs, and deletes other runs' orphans.

prefect-kubernetes reschedules a flow run whose pod got SIGTERM: the same flow run id starts again in a new
pod, while the stage Jobs the old attempt launched still run. Before its first Job, the new attempt deletes
them and waits until their pods have ended; Jobs of runs Prefect no longer has alive go too; Jobs of runs
that are alive stay.
"""
from __future__ import annotations

import json
import uuid

import pytest

from tests.k8s_standin import k8s_standin  # noqa: F401 - fixture
from tests.k8s_standin.fixture import FAKE, FAKE_IMAGE

pytest_plugins = ["tests.prefect_fixtures"]
pytestmark = pytest.mark.slow
NS = "ml-pipeline"


def _job(standin, run_id: str, grace: int = 3) -> str:
    from kubernetes import client as k8s

    from pipeline.launch.k8s_manifests import new_job_name, render_job

    from pipeline.launch.k8s_settings import KubernetesLaunchConfig

    cfg = KubernetesLaunchConfig(namespace=NS, image=FAKE_IMAGE, command=FAKE, termination_grace_seconds=grace)
    name = new_job_name("pretrain", run_id)
    k8s.BatchV1Api(standin.api_client()).create_namespaced_job(
        NS, render_job(cfg, name, "pretrain", [], run_id, {"FAKE_MODE": "sleep:600"}))
    return name


def test_a_restarted_run_stops_its_previous_attempt_and_orphans_but_not_live_runs(
        k8s_standin, flow_env, monkeypatch):  # noqa: F811
    from pipeline.launch import k8s_api
    from kubernetes import client as k8s
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.kubernetes_runs import prepare_namespace
    from flows.parameters import TrainingParameters
    from tests.k8s_standin.fixture import wait_for

    monkeypatch.setattr(k8s_api, "default_api_client", k8s_standin.api_client)
    monkeypatch.setenv("PIPELINE_K8S_CONFIG", json.dumps({"namespace": NS}))
    k8s.CoreV1Api(k8s_standin.api_client()).create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=NS)))

    @flow
    def other():
        pass

    with get_client(sync_client=True) as client:
        live = str(client.create_flow_run(other).id)  # Scheduled: alive, its Job must stay
    restarted, gone = str(uuid.uuid4()), str(uuid.uuid4())  # `gone`: a run Prefect does not know
    jobs = {run: _job(k8s_standin, run) for run in (restarted, gone, live)}
    wait_for(lambda: sum(p["status"]["phase"] == "Running" for p in k8s_standin.pods()) == 3, "3 running pods", 60)
    (old_attempt,) = [p.proc for p in k8s_standin.cluster.pods.values()
                      if p.obj["metadata"]["labels"].get("job-name") == jobs[restarted]]

    @flow
    def attempt_two():
        prepare_namespace(TrainingParameters(launcher="kubernetes"), restarted)

    attempt_two()
    # The previous attempt's pods had ended before the new attempt could launch anything.
    remaining = {j["metadata"]["name"] for j in k8s_standin.jobs()}
    assert jobs[restarted] not in remaining
    mine = [p for p in k8s_standin.pods() if p["metadata"]["labels"].get("job-name") == jobs[restarted]]
    assert mine == []
    assert old_attempt.poll() is not None  # its container had ended, not only been asked to
    wait_for(lambda: jobs[gone] not in {j["metadata"]["name"] for j in k8s_standin.jobs()}, "the orphan deleted", 30)
    assert jobs[live] in {j["metadata"]["name"] for j in k8s_standin.jobs()}
