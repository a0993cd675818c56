"""Reading a stage Job's status: how an attempt ended, which rank was lost and why, why a pod waits.

Pure functions over the official client's V1Job/V1Pod/CoreV1Event objects, no API calls: the launcher
(pipeline/launch/kubernetes.py) polls, these decide. An attempt ends in one of three ways:
done for good (0, or 2 for bad config/data, or a failure no restart can fix), or a rank was lost
(a cause the launcher restarts the group for), or still running. Before that, StartWatch tells a
pod that can never start (fail in seconds) from one that is getting there (pull, scale-up), and a
Job Kueue has not admitted yet.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from kubernetes import client as k8s

from pipeline.errors import EXIT_SIGTERM
from pipeline.launch.k8s_manifests import COMPLETION_INDEX_ANNOTATION, CONTAINER_NAME
from pipeline.launch.k8s_settings import KubernetesLaunchConfig


def summary(stage: str, code: int, attempts: int, restarts: list[str]) -> str:
    causes = "; ".join(f"restart {i}: {c}" for i, c in enumerate(restarts, 1)) or "none"
    return f"{stage}: exit code {code} after {attempts} attempt(s), {len(restarts)} restart(s) ({causes})"


def one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def pending_reason(pod: k8s.V1Pod) -> str:
    """The scheduler's message (Unschedulable) or the kubelet's waiting reason, as one line."""
    for c in pod.status.conditions or []:
        if c.type == "PodScheduled" and c.status == "False":
            return one_line(c.message or c.reason or "Unschedulable")
    for s in pod.status.container_statuses or []:
        if s.state and s.state.waiting and s.state.waiting.reason:
            return one_line(f"{s.state.waiting.reason}: {s.state.waiting.message or ''}").rstrip(": ")
    return "Pending (no reason reported yet)"


def rank(pod: k8s.V1Pod | None, job_name: str, pod_name: str | None = None) -> str:
    if pod is not None:
        index = (pod.metadata.annotations or {}).get(COMPLETION_INDEX_ANNOTATION)
        if index is not None:
            return index
        pod_name = pod.metadata.name
    match = re.match(rf"{re.escape(job_name)}-(\d+)-", pod_name or "")
    return match.group(1) if match else "?"


def exit_code(pod: k8s.V1Pod) -> int | None:
    for s in pod.status.container_statuses or []:
        if s.name == CONTAINER_NAME and s.state and s.state.terminated:
            return s.state.terminated.exit_code
    return None


def disruption(pod: k8s.V1Pod) -> str | None:
    for c in pod.status.conditions or []:
        if c.type == "DisruptionTarget" and c.status == "True":
            return c.reason or "DisruptionTarget"
    return None


def early_disruption(pods: list[k8s.V1Pod], job_name: str) -> tuple[int, str] | None:
    """A rank marked DisruptionTarget (evicted, preempted) while still terminating: end the attempt now.

    The Job controller acts only once that pod has ended, and its SIGTERM checkpoint is a collective
    the other ranks never join, so it would sit out its whole grace period. Deleting the Job at once
    (the caller does) sends every rank SIGTERM together: they checkpoint together and the next
    attempt starts after the checkpoint, not after the grace period."""
    for pod in pods:
        reason = disruption(pod)
        if reason and pod.status.phase in ("Pending", "Running"):
            return EXIT_SIGTERM, f"rank {rank(pod, job_name)} lost (DisruptionTarget: {reason})"
    return None


def outcome(job: k8s.V1Job, pods: list[k8s.V1Pod], job_name: str) -> tuple[int, str | None] | None:
    """None while running; (0 | 2 | code, None) when done for good; (code, cause) when a rank was lost.

    `pods` is every pod seen during the attempt (a lost pod may be gone by the time the Job fails).
    The interim conditions count as the final ones: since Kubernetes 1.31 the Job controller adds
    FailureTarget (or SuccessCriteriaMet) as soon as the outcome is decided and stops the other pods,
    but Failed (Complete) only once every pod has terminated, i.e. after the survivors' grace period.
    Both carry the same reason and message, so a crash (an OOM kill) is seen at once.
    """
    conditions = {c.type: c for c in (job.status.conditions or []) if c.status == "True"}
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        return 0, None
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed is None:
        return None
    by_name = {p.metadata.name: p for p in pods}
    codes = {p.metadata.name: exit_code(p) for p in pods}
    if failed.reason == "PodFailurePolicy":
        # "... pod <ns>/<name> ... matching FailJob rule at index <i>": which rule, which pod.
        match = re.search(r"[Pp]od [^/\s]+/(\S+?)[\s,]", failed.message or "")
        rule = re.search(r"rule at index (\d+)", failed.message or "")
        rules = (job.spec.pod_failure_policy.rules if job.spec.pod_failure_policy else []) or []
        hit = rules[int(rule.group(1))] if rule and int(rule.group(1)) < len(rules) else None
        name = match.group(1) if match else None
        if hit is not None and hit.on_exit_codes is not None:
            return 2, None  # exit 2: bad config or data, never restarted
        if hit is not None and hit.on_pod_conditions:
            pod = by_name.get(name)
            kind = hit.on_pod_conditions[0].type
            reason = (pod is not None and disruption(pod)) or None
            return codes.get(name) or 143, (f"rank {rank(pod, job_name, name)} lost "
                                            f"({kind}{': ' + reason if reason and reason != kind else ''})")
    if 2 in codes.values():
        return 2, None
    if failed.reason == "DeadlineExceeded":
        # The stage's own time limit: a new attempt would only run past it again. The pods the Job
        # controller stopped for it say nothing (their 143 comes after FailureTarget, before Failed).
        nonzero = [codes[p.metadata.name] for p in pods if codes[p.metadata.name] and not p.metadata.deletion_timestamp]
        return (nonzero[-1] if nonzero else 1), None
    # A rank failed on its own (crash, OOM kill, lost node): the first one not stopped by the Job controller.
    disrupted = [p for p in pods if disruption(p)]
    if disrupted:
        pod = disrupted[0]
        return codes.get(pod.metadata.name) or 143, (f"rank {rank(pod, job_name)} lost "
                                                     f"(DisruptionTarget: {disruption(pod)})")
    crashed = sorted((p for p in pods if codes.get(p.metadata.name)),
                     key=lambda p: (p.metadata.deletion_timestamp is not None, finished_at(p)))
    if crashed:
        pod = crashed[0]
        term = next(s.state.terminated for s in pod.status.container_statuses if s.name == CONTAINER_NAME)
        why = f", {term.reason}" if term.reason and term.reason != "Error" else ""
        return term.exit_code, f"rank {rank(pod, job_name)} exited {term.exit_code}{why}"
    lost = [p for p in pods if p.status.phase == "Failed"]
    if lost:
        pod = lost[0]
        return 1, f"rank {rank(pod, job_name)} lost ({pod.status.reason or 'Failed'}: {one_line(pod.status.message)})"
    return 1, f"Job failed ({failed.reason}: {one_line(failed.message)})"


def finished_at(pod: k8s.V1Pod) -> str:
    for s in pod.status.container_statuses or []:
        if s.state and s.state.terminated and s.state.terminated.finished_at:
            return str(s.state.terminated.finished_at)
    return "~"


# ---- a pod on its way to Running: failing, progressing or stalled ----------------------------------------
FAILING, PROGRESSING, STALLED = "failing", "progressing", "stalled"
# The kubelet's waiting reasons for a pod that will not start as it is (a bad or unreachable image, no
# credentials for it, a missing Secret/ConfigMap key in its env).
FAILING_WAITING = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                   "CreateContainerConfigError")
STARTING_WAITING = ("ContainerCreating", "PodInitializing")  # sandbox, volumes, image pull
SCALE_UP = ("TriggeredScaleUp", "Nominated")  # cluster-autoscaler, Karpenter: a node is coming for the pod
NO_SCALE_UP = ("NotTriggerScaleUp",)  # cluster-autoscaler: no node group could fit it
STARTING_TROUBLE = ("FailedMount", "FailedAttachVolume", "FailedCreatePodSandBox")  # kubelet warnings while creating
LOG_EVERY = 60.0  # seconds between "still starting" lines for one pod


@dataclass(frozen=True)
class StartState:
    kind: str  # FAILING, PROGRESSING or STALLED
    reason: str  # ErrImagePull, TriggeredScaleUp, Unschedulable, ContainerCreating...
    text: str  # one line naming the reason and the scheduler's, kubelet's or autoscaler's message


def _when(event: k8s.CoreV1Event) -> str:
    return str(event.last_timestamp or event.event_time or event.first_timestamp or "")


def _latest(events: list[k8s.CoreV1Event] | None, reasons: tuple[str, ...]) -> k8s.CoreV1Event | None:
    """The most recent of `events` with one of `reasons` (ties: the later in the list)."""
    found = [e for e in events or [] if e.reason in reasons]
    return sorted(found, key=_when)[-1] if found else None


def _unschedulable(pod: k8s.V1Pod) -> k8s.V1PodCondition | None:
    return next((c for c in pod.status.conditions or [] if c.type == "PodScheduled" and c.status == "False"), None)


def _waiting(pod: k8s.V1Pod) -> k8s.V1ContainerStateWaiting | None:
    return next((s.state.waiting for s in pod.status.container_statuses or []
                 if s.state and s.state.waiting and s.state.waiting.reason), None)


def needs_events(pod: k8s.V1Pod) -> bool:
    """Only the pod's Events tell a scale-up from none possible, a pull from a failing mount, and why a
    pull is backing off."""
    waiting = _waiting(pod)
    return _unschedulable(pod) is not None or (
        waiting is not None and waiting.reason in (*STARTING_WAITING, "ImagePullBackOff"))


def start_state(pod: k8s.V1Pod, events: list[k8s.CoreV1Event] | None, unschedulable_for: float,
                grace: float) -> StartState:
    """Why a Pending pod has not started. `events`: the pod's Events, None when they could not be read
    (an Unschedulable pod is then STALLED: pending_timeout_seconds); `unschedulable_for`: seconds it has been so."""
    waiting, condition = _waiting(pod), _unschedulable(pod)
    if waiting is not None and waiting.reason in FAILING_WAITING:
        text = one_line(f"{waiting.reason}: {waiting.message or ''}").rstrip(": ")
        failed = _latest(events, ("Failed",)) if waiting.reason == "ImagePullBackOff" else None
        if failed is not None:  # the back-off's own message names no cause; the last pull's Event does
            text += f" ({one_line(failed.message)})"
        return StartState(FAILING, waiting.reason, text)
    if condition is not None:
        why = one_line(condition.message or condition.reason or "Unschedulable")
        scaler = _latest(events, SCALE_UP + NO_SCALE_UP)
        if scaler is not None and scaler.reason in SCALE_UP:
            return StartState(PROGRESSING, scaler.reason, f"{why} ({scaler.reason}: {one_line(scaler.message)})")
        if scaler is not None:
            return StartState(FAILING, "Unschedulable", f"{why} (Unschedulable; no scale-up possible, "
                                                        f"{scaler.reason}: {one_line(scaler.message)})")
        if events is None:  # no way to tell: the limit for a pod without progress
            return StartState(STALLED, "Unschedulable", f"{why} (its Events are unreadable: scale-up unknown)")
        if unschedulable_for >= grace:
            return StartState(FAILING, "Unschedulable", f"{why} (Unschedulable; no cluster-autoscaler scale-up "
                                                        f"within {grace:g} s)")
        return StartState(STALLED, "Unschedulable", why)
    if waiting is not None and waiting.reason in STARTING_WAITING:
        last = _latest(events, STARTING_TROUBLE + ("Pulling", "Pulled"))
        if last is not None and last.reason in STARTING_TROUBLE:
            return StartState(STALLED, last.reason, f"{waiting.reason}: {last.reason}: {one_line(last.message)}")
        doing = one_line(last.message) if last is not None else (waiting.message or "creating the container")
        return StartState(PROGRESSING, waiting.reason, f"{waiting.reason}: {doing}")
    return StartState(STALLED, waiting.reason if waiting else "Pending", pending_reason(pod))


@dataclass(frozen=True)
class Verdict:
    kind: str  # "cannot start", "startup timeout", "pending timeout", "not admitted"
    message: str  # one line: stage, rank, pod, reason, message


class StartWatch:
    """Follows one Job's pods from creation to Running; check() returns a Verdict when the stage must fail.

    Limits (KubernetesLaunchConfig): a FAILING state held over two polls and failure_confirm_seconds;
    a PROGRESSING pod (pulling, scale-up triggered) startup_timeout_seconds after it was first seen; a
    STALLED one pending_timeout_seconds without progress; a suspended (Kueue-queued) Job
    admission_timeout_seconds; a Job whose pods are refused (FailedCreate) like a FAILING pod. Each new
    reason is logged once, then a line every LOG_EVERY seconds.
    """

    def __init__(self, cfg: KubernetesLaunchConfig, stage: str, job_name: str, log: Callable[[str], None]):
        self.cfg, self.stage, self.job_name, self.log = cfg, stage, job_name, log
        self.first: dict[str, float] = {}  # pod -> first seen Pending
        self.progress: dict[str, float] = {}  # pod -> last seen progressing
        self.unschedulable: dict[str, float] = {}  # pod -> Unschedulable since
        self.failing: dict[str, tuple[float, int]] = {}  # pod -> (failing since, polls in a row)
        self.said: dict[str, tuple[str, float]] = {}  # pod or "job" -> (what was logged, when)
        self.queued: float | None = None  # suspended (Kueue) since
        self.created = False  # a pod of the Job has been seen
        self.no_pod: float | None = None  # unsuspended without any pod since
        self.refused: tuple[float, int] | None = None  # FailedCreate since, polls in a row

    def _say(self, key: str, what: str, line: str, now: float) -> None:
        before = self.said.get(key)
        if before is None or before[0] != what or now - before[1] >= LOG_EVERY:
            self.said[key] = (what, now)
            self.log(line)

    def check_job(self, job: k8s.V1Job, pods: list[k8s.V1Pod], events: Callable[[str], list | None],
                  now: float) -> Verdict | None:
        """A Job with no pod: suspended (queued by Kueue) at most admission_timeout_seconds; unsuspended, its
        pods refused (FailedCreate: an unknown runtime class, Pod Security, a quota) fail as a pod would."""
        suspended = bool(job.spec and job.spec.suspend)
        if self.queued is not None and not suspended:
            self.log(f"Job {self.job_name} admitted after {now - self.queued:.0f} s in the queue")
            self.queued = None
        if pods:
            self.created = True
            return None
        queue = f" (LocalQueue {self.cfg.queue_name})" if self.cfg.queue_name else ""
        if suspended:  # queued, or queued again (Kueue preempted it)
            self.queued = now if self.queued is None else self.queued
            waited, limit = now - self.queued, self.cfg.admission_timeout_seconds
            if waited >= limit:
                return Verdict("not admitted", f"{self.stage}: Job {self.job_name} was not admitted by Kueue{queue} "
                                               f"within {limit:g} s (admission_timeout_seconds); it stayed suspended")
            self._say("job", "queued", f"Job {self.job_name} queued{queue}: suspended until Kueue admits it, "
                                       f"{waited:.0f} s of at most {limit:g} s (admission_timeout_seconds)", now)
            return None
        if self.created:
            return None
        self.no_pod = now if self.no_pod is None else self.no_pod
        refused = _latest(events(self.job_name), ("FailedCreate",))
        who = f"{self.stage}: Job {self.job_name}"
        if refused is not None:
            since, polls = self.refused or (now, 0)
            self.refused = (since, polls + 1)
            text = f"FailedCreate: {one_line(refused.message)}"
            if polls + 1 >= 2 and now - since >= self.cfg.failure_confirm_seconds:
                return Verdict("cannot start", f"{who} cannot create its pods: {text}")
            self._say("job", text, f"{who} cannot create its pods: {text}", now)
        elif now - self.no_pod >= self.cfg.pending_timeout_seconds:
            return Verdict("pending timeout", f"{who} has no pod after {self.cfg.pending_timeout_seconds:g} s")
        return None

    def check(self, pods: list[k8s.V1Pod], events: Callable[[str], list | None], now: float) -> Verdict | None:
        """`events(name)`: the Events of the pod `name` (None if unreadable); asked only for pods that need them."""
        cfg, pending = self.cfg, set()
        for pod in pods:
            name = pod.metadata.name
            if pod.status.phase != "Pending" or pod.metadata.deletion_timestamp:
                continue
            pending.add(name)
            first = self.first.setdefault(name, now)
            if _unschedulable(pod):
                unschedulable_for = now - self.unschedulable.setdefault(name, now)
            else:
                unschedulable_for = now - self.unschedulable.pop(name, now)  # 0
            state = start_state(pod, events(name) if needs_events(pod) else [], unschedulable_for,
                                cfg.scale_up_grace_seconds)
            who, elapsed = f"{self.stage}: rank {rank(pod, self.job_name)} (pod {name})", now - first
            if state.kind == FAILING:
                since_f, polls = self.failing.get(name, (now, 0))  # ErrImagePull <-> ImagePullBackOff: one state
                self.failing[name] = (since_f, polls + 1)
                if polls + 1 >= 2 and now - since_f >= cfg.failure_confirm_seconds:
                    return Verdict("cannot start", f"{who} cannot start: {state.text}")
                self._say(name, state.text, f"{who} cannot start: {state.text}; the stage fails unless that "
                                            f"clears within {cfg.failure_confirm_seconds:g} s", now)
            else:
                self.failing.pop(name, None)
            if state.kind == PROGRESSING:
                self.progress[name] = now
                if elapsed >= cfg.startup_timeout_seconds:
                    return Verdict("startup timeout", f"{who} still starting after {cfg.startup_timeout_seconds:g} s "
                                                      f"(startup_timeout_seconds): {state.text}")
                self._say(name, state.reason, f"{who} starting ({elapsed:.0f} s of at most "
                                              f"{cfg.startup_timeout_seconds:g} s): {state.text}", now)
                continue
            stuck = now - max(first, self.progress.get(name, first))
            if stuck >= cfg.pending_timeout_seconds:
                return Verdict("pending timeout", f"{who} still Pending after {cfg.pending_timeout_seconds:g} s: "
                                                  f"{state.text}")
            if state.kind == STALLED and state.reason != "Pending":  # not the moment before scheduling
                self._say(name, state.text, f"{who} waiting: {state.text}", now)
        for gone in set(self.first) - pending:  # running, finished or deleted
            for table in (self.first, self.progress, self.unschedulable, self.failing):
                table.pop(gone, None)
        return None
