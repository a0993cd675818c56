"""The `train` flow with launcher=kubernetes, through the wire-level Kubernetes API stand-in.

Pretrain and finetune run as 2-node x 1-device CPU DDP indexed Jobs (gloo); the pods are
local processes that find rank 0 through MASTER_ADDR (the stand-in maps the pod DNS name
to 127.0.0.1). Artifacts live under a shared absolute `paths.root`, as they would on S3.
"""
from __future__ import annotations

import json

import pytest

from flows.parameters import TrainingParameters
from tests.k8s_standin import k8s_standin  # noqa: F401 - fixture
from tests.prefect_fixtures import TINY, logs_of

pytest_plugins = ["tests.prefect_fixtures"]
pytestmark = pytest.mark.slow


@pytest.fixture
def standin_cluster(k8s_standin, flow_env, monkeypatch, tmp_path):  # noqa: F811
    import pipeline.launch.kubernetes as kubernetes

    monkeypatch.setattr(kubernetes, "default_api_client", k8s_standin.api_client)
    monkeypatch.setenv("PIPELINE_K8S_CONFIG", json.dumps({"log_dir": str(tmp_path / "pod-logs"), "poll_seconds": 0.5}))
    return k8s_standin


def _create_orphan_job(standin, tmp_path) -> str:
    """A Job labelled with a flow run id that Prefect has never seen, as a crashed run leaves behind."""
    from kubernetes import client as k8s

    from pipeline.launch.k8s_manifests import KubernetesLaunchConfig, new_job_name, render_job

    cfg = KubernetesLaunchConfig.from_env()
    orphan_run = "00000000-dead-4000-8000-000000000000"
    name = new_job_name("prepare", orphan_run)
    job = render_job(cfg, name, "prepare", ["--set", f"paths.root={tmp_path / 'orphan'}"], orphan_run, {})
    k8s.BatchV1Api(standin.api_client()).create_namespaced_job(cfg.namespace, job)
    return name


def test_two_node_ddp_stages_through_kubernetes(standin_cluster, flow_env, tmp_path):
    from flows.training import train

    orphan = _create_orphan_job(standin_cluster, tmp_path)
    params = TrainingParameters(launcher="kubernetes", num_nodes=2, devices=1, accelerator="cpu",
                                extra_overrides=[*TINY, f"paths.root={tmp_path / 'artifacts'}"])
    state = train(params, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["stages"] == {s: "ran" for s in ("prepare", "pretrain", "finetune", "evaluate")}
    summary = json.loads((tmp_path / "artifacts" / "models" / "pretrain" / "summary.json").read_text())
    assert summary["world_size"] == 2

    # One indexed Job per stage; the training ones had two pods (completion indexes 0 and 1).
    remaining = standin_cluster.jobs()
    assert orphan not in {job["metadata"]["name"] for job in remaining}, "the crashed run's Job was not cleaned up"
    jobs = {job["metadata"]["labels"]["pipeline.example/stage"]: job for job in remaining}
    assert jobs["pretrain"]["spec"]["completions"] == 2 and jobs["prepare"]["spec"]["completions"] == 1

    messages = [log.message for log in logs_of(state.state_details.flow_run_id)]
    for rank in (0, 1):
        assert any(m.startswith(f"[rank {rank}]") and "world_size=2" in m and f"global_rank={rank}" in m
                   for m in messages), f"no world_size=2 line from rank {rank} in the Prefect task logs"
    assert (tmp_path / "pod-logs").exists() and any((tmp_path / "pod-logs").rglob("rank-1.log"))


def test_kubernetes_launcher_refuses_workspace_local_artifacts(standin_cluster, flow_env):
    from flows.training import train
    from pipeline.errors import ConfigError

    state = train(TrainingParameters(launcher="kubernetes", extra_overrides=list(TINY)), return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match="paths.root"):
        state.result()
    assert standin_cluster.jobs() == []  # refused before any Job was created
