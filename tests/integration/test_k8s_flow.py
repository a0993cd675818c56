"""The `train` flow with launcher=kubernetes, through the wire-level Kubernetes API stand-in.

Pretrain and finetune run as 2-node x 1-device CPU DDP indexed Jobs (gloo); the pods run in the
built image, each in its own network namespace, and find rank 0 through MASTER_ADDR (the stand-in's
cluster DNS answers the pod's name behind the headless Service). Artifacts and the registry are on
S3 (moto on 127.0.0.1, which pods reach at the node address); the pods get the S3 keys only from
the Secret, as on a cluster.
"""
from __future__ import annotations

import json

import pytest

from flows.parameters import TrainingParameters
from tests.k8s_standin import k8s_standin  # noqa: F401 - fixture
from tests.prefect_fixtures import TINY, logs_of

pytest_plugins = ["tests.prefect_fixtures", "tests.s3_fixtures"]
pytestmark = pytest.mark.slow


@pytest.fixture
def standin_cluster(k8s_standin, flow_env, s3, monkeypatch, tmp_path):  # noqa: F811
    from pipeline.launch import k8s_api
    from kubernetes import client as k8s

    monkeypatch.setattr(k8s_api, "default_api_client", k8s_standin.api_client)
    monkeypatch.setenv("PIPELINE_K8S_CONFIG", json.dumps({"namespace": "ml-pipeline", "log_dir": str(tmp_path / "pod-logs"),
                                                          "poll_seconds": 0.5}))
    k8s.CoreV1Api(k8s_standin.api_client()).create_namespaced_secret("ml-pipeline", k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="s3-credentials"), string_data=k8s_standin.lend_s3(s3.endpoint)))
    return k8s_standin


def _on_s3(s3) -> list[str]:
    return [f"paths.root={s3.uri('artifacts')}", f"paths.registry={s3.uri('registry')}"]


def _create_orphan_job(standin, tmp_path) -> str:
    """A Job labelled with a flow run id that Prefect has never seen, as a crashed run leaves behind."""
    from kubernetes import client as k8s

    from pipeline.launch.k8s_manifests import new_job_name, render_job

    from pipeline.launch.k8s_settings import KubernetesLaunchConfig

    cfg = KubernetesLaunchConfig.from_env()
    orphan_run = "00000000-dead-4000-8000-000000000000"
    name = new_job_name("prepare", orphan_run)
    job = render_job(cfg, name, "prepare", ["--help"], orphan_run, {})
    k8s.BatchV1Api(standin.api_client()).create_namespaced_job(cfg.namespace, job)
    return name


def test_two_node_ddp_stages_through_kubernetes(standin_cluster, flow_env, s3, tmp_path):
    from flows.training import train

    orphan = _create_orphan_job(standin_cluster, tmp_path)
    # A transient API error while a stage runs: retried, and the running Job is not deleted for it.
    standin_cluster.fail_next("get", "jobs", 503)
    params = TrainingParameters(launcher="kubernetes", num_nodes=2, devices=1, accelerator="cpu",
                                extra_overrides=[*TINY, *_on_s3(s3)])
    state = train(params, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["stages"] == {s: "ran" for s in ("prepare", "corpus", "pretrain", "finetune", "evaluate")}
    summary = json.loads(s3.fs.cat(f"{_keyed(s3, 'pretrain')}/summary.json"))
    assert summary["world_size"] == 2
    assert [r[3] for r in standin_cluster.requests("delete", "jobs")] == [orphan]
    champion = json.loads(s3.fs.cat(f"{s3.bucket}/registry/champion.json"))
    card = json.loads(s3.fs.cat(f"{champion['release']}/model_card.json"))
    assert card["stages"] == result["stages"]  # how each stage was obtained (restarts and causes too)

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

    # Unchanged stages never relaunch: only a finetune param changed -> only finetune and evaluate run;
    # then the same inputs again -> no stage Job at all (outputs stay under their keys on S3).
    def launched(before: set[str]) -> list[str]:
        new = [j for j in standin_cluster.jobs() if j["metadata"]["name"] not in before]
        return sorted(j["metadata"]["labels"]["pipeline.example/stage"] for j in new)

    for extra, expected in ((["finetune.epochs=3"], ["evaluate", "finetune"]), (["finetune.epochs=3"], [])):
        before = {j["metadata"]["name"] for j in standin_cluster.jobs()}
        again = train(params.model_copy(update={"extra_overrides": [*params.extra_overrides, *extra]}),
                      return_state=True)
        assert again.is_completed(), again
        assert launched(before) == expected
        stages = again.result()["stages"]
        assert sorted(s for s, outcome in stages.items() if outcome == "ran") == expected
        assert {outcome for s, outcome in stages.items() if s not in expected} == {"restored"}
    messages = [log.message for log in logs_of(again.state_details.flow_run_id)]
    assert any(m.startswith("pretrain: restored from the stage cache (key ") for m in messages)


def _keyed(s3, stage: str) -> str:
    (folder,) = s3.fs.ls(f"{s3.bucket}/artifacts/stages/{stage}")
    return f"{folder}/{stage}"


def test_kubernetes_launcher_refuses_pod_local_artifacts_and_registry(standin_cluster, flow_env):
    from flows.training import train
    from pipeline.errors import ConfigError

    state = train(TrainingParameters(launcher="kubernetes", extra_overrides=list(TINY)), return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match="paths.root") as caught:
        state.result()
    assert "paths.registry" in str(caught.value)  # both named at once
    assert standin_cluster.jobs() == []  # refused before any Job was created


def test_missing_s3_credentials_fail_before_any_job_naming_the_secret(standin_cluster, flow_env, s3, monkeypatch):
    from flows.training import train
    from pipeline import s3 as s3_settings
    from pipeline.errors import DataError

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)  # a flow-run pod whose Secret does not exist
    s3_settings.reset()
    state = train(TrainingParameters(launcher="kubernetes", extra_overrides=[*TINY, *_on_s3(s3)]), return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError, match="no AWS credentials") as caught:
        state.result()
    assert "Secret 's3-credentials'" in str(caught.value)
    assert standin_cluster.jobs() == []


def test_forbidden_fails_the_flow_at_once_without_task_retries(standin_cluster, flow_env, s3):
    from flows.training import train
    from pipeline.launch.k8s_api import KubernetesLaunchError

    standin_cluster.fail_next("create", "jobs", 403)
    state = train(TrainingParameters(launcher="kubernetes", extra_overrides=[*TINY, *_on_s3(s3)]), return_state=True)
    assert state.is_failed()
    with pytest.raises(KubernetesLaunchError, match="cannot create jobs.batch in namespace 'ml-pipeline'"):
        state.result()
    # prepare and corpus start together, one create each; the task's retries (2) did not repeat the forbidden one
    assert len(standin_cluster.requests("create", "jobs")) <= 2
