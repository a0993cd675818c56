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
    COMPLETION_INDEX_ANNOTATION, CONTAINER_NAME, render_job,
)
from pipeline.launch.k8s_settings import KubernetesLaunchConfig

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


# ---- StartWatch: a pod that can never start, one on its way, a Job in Kueue's queue ------------------------

START = KubernetesLaunchConfig(namespace=NS, pending_timeout_seconds=300, startup_timeout_seconds=1800,
                               failure_confirm_seconds=5, scale_up_grace_seconds=30, admission_timeout_seconds=600,
                               queue_name="gpu-h100")
SCHEDULER = "0/12 nodes are available: 12 Insufficient nvidia.com/gpu."


def _pending(rank: int = 0, waiting: tuple[str, str] | None = None, unschedulable: bool = False) -> k8s.V1Pod:
    conditions = [k8s.V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable",
                                     message=SCHEDULER)] if unschedulable else []
    statuses = [k8s.V1ContainerStatus(
        name=CONTAINER_NAME, image="registry.example/pipeline:1", image_id="", ready=False, restart_count=0,
        state=k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(reason=waiting[0], message=waiting[1])))
    ] if waiting else None
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=_name(rank), namespace=NS,
                                               annotations={COMPLETION_INDEX_ANNOTATION: str(rank)}),
                     status=k8s.V1PodStatus(phase="Pending", conditions=conditions, container_statuses=statuses))


def _event(reason: str, message: str, at: int = 0, kind: str = "Normal") -> k8s.CoreV1Event:
    return k8s.CoreV1Event(metadata=k8s.V1ObjectMeta(name=f"e{at}"), involved_object=k8s.V1ObjectReference(),
                           reason=reason, message=message, type=kind, last_timestamp=T0 + timedelta(seconds=at))


SCALE_UP = _event("TriggeredScaleUp", "pod triggered scale-up: [{gpu-pool 0->2 (max: 4)}]", 1)
NO_SCALE_UP = _event("NotTriggerScaleUp", "pod didn't trigger scale-up: 1 Insufficient nvidia.com/gpu", 2)


@pytest.mark.parametrize("pod, events, unschedulable_for, expected", [
    (_pending(waiting=("ErrImagePull", "registry.example/x:1: not found")), [], 0,
     ("failing", "ErrImagePull", "ErrImagePull: registry.example/x:1: not found")),
    (_pending(waiting=("ImagePullBackOff", 'Back-off pulling image "x:1"')),
     [_event("Failed", 'Failed to pull image "x:1": 401 Unauthorized', kind="Warning")], 0,
     ("failing", "ImagePullBackOff", 'ImagePullBackOff: Back-off pulling image "x:1" (Failed to pull image "x:1": '
                                     '401 Unauthorized)')),
    (_pending(waiting=("InvalidImageName", "invalid reference format")), [], 0,
     ("failing", "InvalidImageName", "InvalidImageName: invalid reference format")),
    (_pending(waiting=("CreateContainerConfigError", 'secret "s3" not found')), [], 0,
     ("failing", "CreateContainerConfigError", 'CreateContainerConfigError: secret "s3" not found')),
    (_pending(unschedulable=True), [SCALE_UP], 600,
     ("progressing", "TriggeredScaleUp", f"{SCHEDULER} (TriggeredScaleUp: {SCALE_UP.message})")),
    (_pending(unschedulable=True), [_event("Nominated", "Pod should schedule on: nodeclaim/gpu-x")], 600,
     ("progressing", "Nominated", f"{SCHEDULER} (Nominated: Pod should schedule on: nodeclaim/gpu-x)")),
    (_pending(unschedulable=True), [NO_SCALE_UP], 0,
     ("failing", "Unschedulable", f"{SCHEDULER} (Unschedulable; no scale-up possible, NotTriggerScaleUp: "
                                  f"{NO_SCALE_UP.message})")),
    # The latest autoscaler word counts: a scale-up that then became impossible, and the other way round.
    (_pending(unschedulable=True), [SCALE_UP, NO_SCALE_UP], 0, ("failing", "Unschedulable", None)),
    (_pending(unschedulable=True), [NO_SCALE_UP, _event("TriggeredScaleUp", "again", 3)], 0,
     ("progressing", "TriggeredScaleUp", None)),
    (_pending(unschedulable=True), [], 10, ("stalled", "Unschedulable", SCHEDULER)),
    (_pending(unschedulable=True), [], 30,
     ("failing", "Unschedulable", f"{SCHEDULER} (Unschedulable; no cluster-autoscaler scale-up within 30 s)")),
    (_pending(unschedulable=True), None, 600, ("stalled", "Unschedulable", None)),  # Events unreadable
    (_pending(waiting=("ContainerCreating", None)), [_event("Pulling", 'Pulling image "x:1"')], 0,
     ("progressing", "ContainerCreating", 'ContainerCreating: Pulling image "x:1"')),
    (_pending(waiting=("ContainerCreating", None)),
     [_event("Pulling", 'Pulling image "x:1"'), _event("FailedMount", 'configmap "c" not found', 5, "Warning")], 0,
     ("stalled", "FailedMount", 'ContainerCreating: FailedMount: configmap "c" not found')),
    (_pending(), [], 0, ("stalled", "Pending", "Pending (no reason reported yet)")),
], ids=["pull-not-found", "backoff-401", "invalid-name", "missing-secret", "scale-up", "karpenter", "no-scale-up",
        "scale-up-then-none", "none-then-scale-up", "unschedulable-in-grace", "unschedulable-past-grace",
        "events-unreadable", "pulling", "failed-mount", "no-reason"])
def test_start_state_tells_failing_from_progressing(pod, events, unschedulable_for, expected):
    state = job_status.start_state(pod, events, unschedulable_for, grace=30)
    assert (state.kind, state.reason) == expected[:2]
    if expected[2] is not None:
        assert state.text == expected[2]


class _Clock:
    """Drives a StartWatch poll by poll: (pods, events by name) at a given second."""

    def __init__(self, cfg=START):
        self.lines: list[str] = []
        self.watch = job_status.StartWatch(cfg, "pretrain", JOB, self.lines.append)

    def poll(self, at: float, pods, events=None, job=None):
        events = events or {}
        return (self.watch.check_job(job or _job(), pods, lambda name: events.get(name, []), at)
                or self.watch.check(pods, lambda name: events.get(name, []), at))


def test_a_failing_pod_fails_once_confirmed_over_two_polls_and_the_confirmation_time():
    clock = _Clock()
    pull = _pending(1, ("ErrImagePull", "not found"))
    backoff = _pending(1, ("ImagePullBackOff", 'Back-off pulling image "x:1"'))
    assert clock.poll(0, [pull]) is None and clock.poll(2, [backoff]) is None  # < 5 s: not yet
    assert clock.lines == [f"pretrain: rank 1 (pod {_name(1)}) cannot start: ErrImagePull: not found; the stage "
                           f"fails unless that clears within 5 s",
                           f"pretrain: rank 1 (pod {_name(1)}) cannot start: ImagePullBackOff: Back-off pulling "
                           f"image \"x:1\"; the stage fails unless that clears within 5 s"]
    verdict = clock.poll(5, [backoff])  # ErrImagePull <-> ImagePullBackOff is one failing state
    assert verdict.kind == "cannot start"
    assert verdict.message == (f"pretrain: rank 1 (pod {_name(1)}) cannot start: ImagePullBackOff: Back-off pulling "
                               f"image \"x:1\"")
    # A momentary failure that clears starts over.
    clock = _Clock()
    assert clock.poll(0, [pull]) is None and clock.poll(4, [_pending(1, ("ContainerCreating", None))]) is None
    assert clock.poll(6, [pull]) is None and clock.poll(10, [pull]) is None
    assert clock.poll(11, [pull]).kind == "cannot start"


def test_a_single_poll_is_never_enough():
    clock = _Clock(START.model_copy(update={"failure_confirm_seconds": 0}))
    pod = _pending(0, ("InvalidImageName", "invalid reference format"))
    assert clock.poll(0, [pod]) is None and clock.poll(0.5, [pod]).kind == "cannot start"


def test_a_pull_or_a_scale_up_may_take_the_startup_limit_not_the_pending_one():
    clock = _Clock()
    pulling = _pending(0, ("ContainerCreating", None))
    scaling = _pending(1, unschedulable=True)
    events = {_name(0): [_event("Pulling", 'Pulling image "x:1"')], _name(1): [SCALE_UP]}
    for at in range(0, 1800, 60):
        assert clock.poll(at, [pulling, scaling], events) is None, at
    assert sum("starting" in line for line in clock.lines) == 60  # each pod: one line a minute
    assert clock.lines[0] == (f"pretrain: rank 0 (pod {_name(0)}) starting (0 s of at most 1800 s): "
                              f"ContainerCreating: Pulling image \"x:1\"")
    verdict = clock.poll(1800, [pulling, scaling], events)
    assert verdict.kind == "startup timeout" and verdict.message == (
        f"pretrain: rank 0 (pod {_name(0)}) still starting after 1800 s (startup_timeout_seconds): ContainerCreating: "
        f"Pulling image \"x:1\"")


def test_no_progress_gets_the_pending_limit_counted_from_the_last_progress():
    clock = _Clock()
    mount = _pending(0, ("ContainerCreating", None))
    pulling = {_name(0): [_event("Pulling", 'Pulling image "x:1"')]}
    failing_mount = {_name(0): [_event("FailedMount", 'secret "tls" not found', 1, "Warning")]}
    assert clock.poll(0, [mount], pulling) is None and clock.poll(100, [mount], pulling) is None
    assert clock.poll(399, [mount], failing_mount) is None
    verdict = clock.poll(400, [mount], failing_mount)
    assert verdict.kind == "pending timeout" and verdict.message == (
        f"pretrain: rank 0 (pod {_name(0)}) still Pending after 300 s: ContainerCreating: FailedMount: "
        f"secret \"tls\" not found")


def test_unschedulable_without_an_autoscaler_word_fails_after_the_grace():
    clock = _Clock()
    pod = _pending(0, unschedulable=True)
    assert clock.poll(0, [pod]) is None and clock.poll(29, [pod]) is None
    assert clock.lines == [f"pretrain: rank 0 (pod {_name(0)}) waiting: {SCHEDULER}"]
    assert clock.poll(30, [pod]) is None  # failing from here, confirmed 5 s later
    verdict = clock.poll(35, [pod])
    assert verdict.kind == "cannot start" and verdict.message.endswith("(Unschedulable; no cluster-autoscaler "
                                                                       "scale-up within 30 s)")


def _suspended(suspend: bool = True) -> k8s.V1Job:
    job = _job()
    job.spec.suspend = suspend
    return job


def test_a_queued_job_waits_for_admission_at_most_the_admission_limit():
    clock = _Clock()
    assert clock.poll(0, [], job=_suspended()) is None and clock.poll(599, [], job=_suspended()) is None
    assert clock.lines == [f"Job {JOB} queued (LocalQueue gpu-h100): suspended until Kueue admits it, {at} s of at "
                           f"most 600 s (admission_timeout_seconds)" for at in (0, 599)]  # then once a minute
    verdict = clock.poll(600, [], job=_suspended())
    assert verdict.kind == "not admitted" and verdict.message == (
        f"pretrain: Job {JOB} was not admitted by Kueue (LocalQueue gpu-h100) within 600 s "
        f"(admission_timeout_seconds); it stayed suspended")
    clock = _Clock()
    assert clock.poll(0, [], job=_suspended()) is None
    assert clock.poll(120, [_pending(0)], job=_suspended(False)) is None
    assert clock.lines[-1] == f"Job {JOB} admitted after 120 s in the queue"


def test_pods_the_api_refuses_fail_the_job_in_seconds():
    # An unknown runtime class (or Pod Security, a quota): the Job controller cannot create any pod.
    refused = {JOB: [_event("FailedCreate", f'Error creating: pods "{_name(0)}" is forbidden: pod rejected: '
                                           'RuntimeClass "nvidia" not found', kind="Warning")]}
    clock = _Clock()
    assert clock.poll(0, [], refused) is None and clock.poll(4, [], refused) is None
    verdict = clock.poll(5, [], refused)
    assert verdict.kind == "cannot start" and verdict.message == (
        f"pretrain: Job {JOB} cannot create its pods: FailedCreate: Error creating: pods \"{_name(0)}\" is forbidden: "
        f"pod rejected: RuntimeClass \"nvidia\" not found")
    clock = _Clock()
    assert clock.poll(0, []) is None and clock.poll(299, []) is None
    assert clock.poll(300, []).message == f"pretrain: Job {JOB} has no pod after 300 s"
