"""job_status.outcome(): a Job's interim FailureTarget/SuccessCriteriaMet conditions decide as its terminal ones do.

Kubernetes 1.31+ adds FailureTarget as soon as a Job has failed and stops the surviving pods, but adds
Failed (same reason and message) only when every pod has terminated, a grace period later. Each case
reads the same at three moments: FailureTarget alone with the survivors still terminating, FailureTarget
alone with them gone, and FailureTarget + Failed. Objects are the official client's models.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from kubernetes import client as k8s

from pipeline.launch import job_status
from pipeline.launch.k8s_manifests import (
    COMPLETION_INDEX_ANNOTATION, CONTAINER_NAME, KubernetesLaunchConfig, render_job,
)

NS, JOB = "ml", "pretrain-run-abc123"
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
POLICY = k8s.V1PodFailurePolicy(rules=[
    k8s.V1PodFailurePolicyRule(action="FailJob", on_exit_codes=k8s.V1PodFailurePolicyOnExitCodesRequirement(
        container_name=CONTAINER_NAME, operator="In", values=[2])),
    k8s.V1PodFailurePolicyRule(action="FailJob", on_pod_conditions=[
        k8s.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")]),
])


def test_the_policy_here_is_the_launchers():
    rendered = render_job(KubernetesLaunchConfig(namespace=NS), JOB, "pretrain", [], "run")
    assert k8s.ApiClient().sanitize_for_serialization(POLICY) == rendered["spec"]["podFailurePolicy"]


def _name(rank: int) -> str:
    return f"{JOB}-{rank}-x7k2p"


def _pod(rank: int, code: int | None = None, reason: str | None = None, stopped: bool = False,
         disrupted: str | None = None, at: int = 0) -> k8s.V1Pod:
    """Rank `rank`'s pod: running (code None) or exited `code`; `stopped`: deleted by the Job controller."""
    if code is None:
        phase, state = "Running", k8s.V1ContainerState(running=k8s.V1ContainerStateRunning(started_at=T0))
    else:
        phase = "Succeeded" if code == 0 else "Failed"
        state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(
            exit_code=code, reason=reason or ("Completed" if code == 0 else "Error"), started_at=T0,
            finished_at=T0 + timedelta(seconds=10 + at)))
    conditions = [k8s.V1PodCondition(type="DisruptionTarget", status="True", reason=disrupted)] * bool(disrupted)
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=_name(rank), namespace=NS, annotations={COMPLETION_INDEX_ANNOTATION: str(rank)},
                                  deletion_timestamp=T0 + timedelta(seconds=5) if stopped or disrupted else None),
        status=k8s.V1PodStatus(phase=phase, conditions=conditions, container_statuses=[k8s.V1ContainerStatus(
            name=CONTAINER_NAME, image="registry.example/pipeline:test", image_id="", ready=code is None,
            restart_count=0, state=state)]))


def _job(*conditions: tuple[str, str, str]) -> k8s.V1Job:
    return k8s.V1Job(
        metadata=k8s.V1ObjectMeta(name=JOB, namespace=NS),
        spec=k8s.V1JobSpec(template=k8s.V1PodTemplateSpec(), backoff_limit=0, pod_failure_policy=POLICY),
        status=k8s.V1JobStatus(conditions=[
            k8s.V1JobCondition(type=kind, status="True", reason=reason, message=message,
                               last_transition_time=T0 + timedelta(seconds=20))
            for kind, reason, message in conditions]))


def _three_moments(reason: str, message: str, lost: list[k8s.V1Pod], survivors_running: list[k8s.V1Pod],
                   survivors_exited: list[k8s.V1Pod]) -> list:
    """outcome() at FailureTarget (survivors terminating), FailureTarget (survivors exited), and Failed."""
    target = ("FailureTarget", reason, message)
    return [job_status.outcome(_job(target), lost + survivors_running, JOB),
            job_status.outcome(_job(target), lost + survivors_exited, JOB),
            job_status.outcome(_job(target, ("Failed", reason, message)), lost + survivors_exited, JOB)]


def test_a_running_job_has_no_outcome():
    assert job_status.outcome(_job(), [_pod(0), _pod(1)], JOB) is None


def test_crash_oom_kill_is_a_lost_rank_as_soon_as_failure_target_appears():
    # backoffLimit 0: the OOM-killed rank fails the Job; rank 0 is stopped by the controller (SIGTERM -> 143).
    outcomes = _three_moments("BackoffLimitExceeded", "Job has reached the specified backoff limit",
                              lost=[_pod(1, 137, "OOMKilled")], survivors_running=[_pod(0, stopped=True)],
                              survivors_exited=[_pod(0, 143, stopped=True, at=5)])
    assert outcomes == [(137, "rank 1 exited 137, OOMKilled")] * 3


def test_crash_before_the_controller_stops_the_other_rank():
    # FailureTarget can be read before the survivor's deletionTimestamp is: the crashed rank is still named.
    target = ("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    assert job_status.outcome(_job(target), [_pod(0), _pod(1, 1)], JOB) == (1, "rank 1 exited 1")


def test_pod_failure_policy_disruption_target_is_a_lost_rank():
    message = f"Pod {NS}/{_name(1)} has condition DisruptionTarget matching FailJob rule at index 1"
    outcomes = _three_moments("PodFailurePolicy", message,
                              lost=[_pod(1, 143, disrupted="EvictionByEvictionAPI")],
                              survivors_running=[_pod(0, stopped=True)],
                              survivors_exited=[_pod(0, 143, stopped=True, at=5)])
    assert outcomes == [(143, "rank 1 lost (DisruptionTarget: EvictionByEvictionAPI)")] * 3


def test_pod_failure_policy_disruption_target_in_the_older_message_wording():
    # What the stand-in wrote before it worded the message as the Job controller does: same answer.
    message = (f"Container {CONTAINER_NAME} for pod {NS}/{_name(1)} failed with exit code 143 "
               f"matching FailJob rule at index 1")
    outcomes = _three_moments("PodFailurePolicy", message, lost=[_pod(1, 143, disrupted="TerminationByKubelet")],
                              survivors_running=[_pod(0, stopped=True)],
                              survivors_exited=[_pod(0, 143, stopped=True, at=5)])
    assert outcomes == [(143, "rank 1 lost (DisruptionTarget: TerminationByKubelet)")] * 3


def test_exit_2_is_done_for_good():
    message = (f"Container {CONTAINER_NAME} for pod {NS}/{_name(1)} failed with exit code 2 "
               f"matching FailJob rule at index 0")
    outcomes = _three_moments("PodFailurePolicy", message, lost=[_pod(1, 2)], survivors_running=[_pod(0, stopped=True)],
                              survivors_exited=[_pod(0, 143, stopped=True, at=5)])
    assert outcomes == [(2, None)] * 3


def test_deadline_is_done_for_good_whatever_the_stopped_pods_exited_with():
    # activeDeadlineSeconds: the controller stops every rank; their 143 arrives between FailureTarget and Failed.
    outcomes = _three_moments("DeadlineExceeded", "Job was active longer than specified deadline", lost=[],
                              survivors_running=[_pod(0, stopped=True), _pod(1, stopped=True)],
                              survivors_exited=[_pod(0, 143, stopped=True), _pod(1, 143, stopped=True, at=1)])
    assert outcomes == [(1, None)] * 3


@pytest.mark.parametrize("conditions", [
    [("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods")],
    [("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"),
     ("Complete", "CompletionsReached", "Reached expected number of succeeded pods")],
    [("Complete", None, None)],  # before 1.31: Complete alone
])
def test_success_criteria_met_is_success(conditions):
    assert job_status.outcome(_job(*conditions), [_pod(0, 0), _pod(1, 0, at=1)], JOB) == (0, None)


def test_failed_alone_still_works():
    # Clusters before 1.31 (or with the feature gates off) add Failed at once, without FailureTarget.
    failed = ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    assert job_status.outcome(_job(failed), [_pod(0), _pod(1, 137, "OOMKilled")], JOB) == (
        137, "rank 1 exited 137, OOMKilled")
