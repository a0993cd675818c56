"""The stand-in's Job controller follows Kubernetes 1.31+ (pkg/controller/job/job_controller.go, syncJob):
interim condition first (FailureTarget / SuccessCriteriaMet), remaining pods deleted gracefully, no pod
created meanwhile, terminal condition (Failed / Complete) only once no pod is left terminating, and
completionTime only for Complete. Grace periods are the pods' own unless a cap is asked for.

No process runs here: the Cluster's loop is stopped at once and the test plays the kubelet, writing
each pod's status, then runs one controller pass (`_reconcile`) at a time.
"""
from __future__ import annotations

import json
import time

import pytest
from kubernetes import client as k8s

from pipeline.launch import job_status
from pipeline.launch.k8s_manifests import CONTAINER_NAME, render_job
from pipeline.launch.k8s_settings import KubernetesLaunchConfig
from tests.k8s_standin import k8s_standin  # noqa: F401  (pytest fixture)
from tests.k8s_standin.cluster import Cluster

NS, JOB = "ml", "pretrain-run-abc123"
GRACE = 120


def _cluster(tmp_path, **options) -> Cluster:
    cluster = Cluster(tmp_path, tmp_path / "pod-logs", **options)
    cluster.shutdown()  # no controller loop and no kubelet: nothing starts a process
    return cluster


@pytest.fixture
def cluster(tmp_path):
    return _cluster(tmp_path)


def _create(cluster: Cluster, nodes: int = 2, **job_spec):
    cfg = KubernetesLaunchConfig(namespace=NS, image="registry.example/pipeline:test", nodes=nodes,
                                 termination_grace_seconds=GRACE)
    job = render_job(cfg, JOB, "pretrain", [], "run")
    job["spec"].update(job_spec)
    with cluster.lock:
        obj = cluster.create("jobs", job)
    return cluster.jobs[obj["metadata"]["uid"]]


def _pods(cluster: Cluster, state) -> list:
    """The Job's pods, by completion index (what the API still lists)."""
    return sorted((p for p in cluster.pods.values() if p.job_uid == state.obj["metadata"]["uid"]),
                  key=lambda p: p.index)


def _running(*pods) -> None:
    for pod in pods:
        pod.obj["status"].update(phase="Running", containerStatuses=[_container({"running": {}})])


def _exited(pod, code: int, reason: str | None = None) -> None:
    """The kubelet's report of the container's end."""
    pod.obj["status"].update(phase="Succeeded" if code == 0 else "Failed", containerStatuses=[_container(
        {"terminated": {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error")}})])


def _container(state: dict) -> dict:
    return {"name": CONTAINER_NAME, "image": "registry.example/pipeline:test", "imageID": "",
            "ready": "running" in state, "restartCount": 0, "state": state}


def _sync(cluster: Cluster, state, passes: int = 1) -> None:
    for _ in range(passes):
        with cluster.lock:
            cluster._reconcile(state)


def _conditions(state) -> list[tuple[str, str, str]]:
    return [(c["type"], c.get("reason"), c.get("message")) for c in state.obj["status"].get("conditions", [])]


def _outcome(state, pods) -> tuple | None:
    """What the launcher would conclude from the Job and pods as the API serves them."""
    api = k8s.ApiClient()

    def model(obj: dict, kind: str):
        return api.deserialize(json.dumps(obj), kind, "application/json")

    return job_status.outcome(model(state.obj, "V1Job"), [model(p.obj, "V1Pod") for p in pods], JOB)


def test_a_crash_adds_failure_target_stops_the_survivor_and_fails_only_once_it_has_exited(cluster):
    state = _create(cluster)
    rank0, rank1 = _pods(cluster, state)
    _running(rank0, rank1)
    _sync(cluster, state)
    assert _conditions(state) == [] and state.obj["status"]["active"] == 2

    _exited(rank1, 137, "OOMKilled")  # backoffLimit 0: this failure fails the Job
    _sync(cluster, state)
    target = ("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    assert _conditions(state) == [target]
    assert rank0.obj["metadata"]["deletionTimestamp"]
    assert rank0.obj["metadata"]["deletionGracePeriodSeconds"] == GRACE  # the pod's own, uncapped
    status = state.obj["status"]
    assert (status["active"], status["ready"], status["terminating"], status["failed"]) == (0, 0, 1, 2)
    assert _outcome(state, [rank0, rank1]) == (137, "rank 1 exited 137, OOMKilled")  # seen at once

    _sync(cluster, state, passes=3)  # the survivor is still in its grace period: no Failed, no new pod
    assert _conditions(state) == [target] and _pods(cluster, state) == [rank0, rank1]

    _exited(rank0, 143)  # SIGTERM -> checkpoint -> exit 143
    _sync(cluster, state)
    assert _conditions(state) == [target, ("Failed", *target[1:])]
    assert "completionTime" not in state.obj["status"] and state.obj["status"]["terminating"] == 0
    assert state.finished_at is not None
    assert _outcome(state, [rank0, rank1]) == (137, "rank 1 exited 137, OOMKilled")
    assert _pods(cluster, state) == [rank0, rank1]  # nothing was created after the failure


def test_a_single_pod_failure_adds_failure_target_and_failed_in_one_pass(cluster):
    state = _create(cluster, nodes=1)
    (rank0,) = _pods(cluster, state)
    _exited(rank0, 1)
    _sync(cluster, state)
    target = ("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    assert _conditions(state) == [target, ("Failed", *target[1:])]
    assert "completionTime" not in state.obj["status"]


def test_exit_2_fails_the_job_by_pod_failure_policy_worded_as_the_controller_does(cluster):
    state = _create(cluster)
    rank0, rank1 = _pods(cluster, state)
    _running(rank0, rank1)
    _exited(rank0, 2)
    _sync(cluster, state)
    message = (f"Container {CONTAINER_NAME} for pod {NS}/{rank0.name} failed with exit code 2 "
               f"matching FailJob rule at index 0")
    assert _conditions(state) == [("FailureTarget", "PodFailurePolicy", message)]
    assert rank1.obj["metadata"]["deletionTimestamp"]
    assert _outcome(state, [rank0, rank1]) == (2, None)
    _exited(rank1, 143)
    _sync(cluster, state)
    assert _conditions(state)[1] == ("Failed", "PodFailurePolicy", message)
    assert _outcome(state, [rank0, rank1]) == (2, None)


def test_eviction_holds_the_slot_until_the_pod_has_failed_then_fails_the_job(cluster):
    state = _create(cluster)
    rank0, rank1 = _pods(cluster, state)
    _running(rank0, rank1)
    with cluster.lock:
        cluster.evict(rank1.name)  # DisruptionTarget + graceful deletion
    _sync(cluster, state, passes=2)
    # podFailurePolicy set -> podReplacementPolicy Failed: no replacement while it terminates, and the
    # FailJob rule acts only once the pod has failed.
    assert _conditions(state) == [] and _pods(cluster, state) == [rank0, rank1]
    assert (state.obj["status"]["active"], state.obj["status"]["terminating"]) == (1, 1)

    _exited(rank1, 143)
    _sync(cluster, state)
    message = f"Pod {NS}/{rank1.name} has condition DisruptionTarget matching FailJob rule at index 1"
    assert _conditions(state) == [("FailureTarget", "PodFailurePolicy", message)]
    assert rank0.obj["metadata"]["deletionTimestamp"] and _pods(cluster, state) == [rank0, rank1]
    assert _outcome(state, [rank0, rank1]) == (143, "rank 1 lost (DisruptionTarget: EvictionByEvictionAPI)")

    _exited(rank0, 143)
    _sync(cluster, state)
    assert [c[0] for c in _conditions(state)] == ["FailureTarget", "Failed"]
    assert _outcome(state, [rank0, rank1]) == (143, "rank 1 lost (DisruptionTarget: EvictionByEvictionAPI)")


def test_active_deadline_stops_every_pod_first(cluster):
    state = _create(cluster, activeDeadlineSeconds=30)
    pods = _pods(cluster, state)
    _running(*pods)
    state.started -= 31
    _sync(cluster, state)
    target = ("FailureTarget", "DeadlineExceeded", "Job was active longer than specified deadline")
    assert _conditions(state) == [target]
    assert all(p.obj["metadata"]["deletionTimestamp"] for p in pods) and state.obj["status"]["terminating"] == 2
    assert _outcome(state, pods) == (1, None)
    for pod in pods:
        _exited(pod, 143)
    _sync(cluster, state)
    assert _conditions(state) == [target, ("Failed", *target[1:])] and "completionTime" not in state.obj["status"]
    assert _outcome(state, pods) == (1, None)


def test_success_adds_success_criteria_met_then_complete_with_completion_time(cluster):
    state = _create(cluster)
    rank0, rank1 = _pods(cluster, state)
    _exited(rank0, 0)
    _sync(cluster, state)
    assert _conditions(state) == [] and state.obj["status"]["completedIndexes"] == "0"
    _exited(rank1, 0)
    _sync(cluster, state)
    met = ("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods")
    assert _conditions(state) == [met, ("Complete", *met[1:])]
    status = state.obj["status"]
    assert status["completionTime"] == status["conditions"][1]["lastTransitionTime"]
    assert (status["succeeded"], status["completedIndexes"]) == (2, "0-1")
    assert (status["active"], status["terminating"]) == (0, 0)
    assert _outcome(state, [rank0, rank1]) == (0, None)


@pytest.mark.parametrize("cap, kill_after", [(None, GRACE), (5, 5)])
def test_grace_period_is_the_pods_own_unless_a_cap_is_asked_for(tmp_path, cap, kill_after):
    cluster = _cluster(tmp_path, **({} if cap is None else {"max_grace": cap}))
    rank0, _ = _pods(cluster, _create(cluster))
    before = time.monotonic()
    with cluster.lock:
        cluster.delete("pods", NS, rank0.name)  # `kubectl delete pod`: the pod's terminationGracePeriodSeconds
    assert rank0.obj["metadata"]["deletionGracePeriodSeconds"] == GRACE
    assert before + kill_after <= rank0.kill_at <= time.monotonic() + kill_after  # SIGKILL after that


def test_the_fixture_does_not_cap_grace_periods(k8s_standin):  # noqa: F811
    assert k8s_standin.cluster.max_grace is None
