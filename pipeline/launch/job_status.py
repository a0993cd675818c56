"""Reading a stage Job's status: how an attempt ended, which rank was lost and why, why a pod waits.

Pure functions over the official client's V1Job/V1Pod objects, no API calls: the launcher
(pipeline/launch/kubernetes.py) polls, these decide. An attempt ends in one of three ways:
done for good (0, or 2 for bad config/data, or a failure no restart can fix), or a rank was lost
(a cause the launcher restarts the group for), or still running.
"""
from __future__ import annotations

import re
from typing import Callable

from kubernetes import client as k8s

from pipeline.errors import EXIT_SIGTERM
from pipeline.launch.k8s_manifests import COMPLETION_INDEX_ANNOTATION, CONTAINER_NAME


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


def report_waiting(pods: list[k8s.V1Pod], seen: set[tuple[str, str]], log: Callable[[str], None]) -> None:
    """Say once why a pod is stuck (no GPU node, missing Secret, image pull): else it looks hung."""
    for pod in pods:
        reasons = [f"{c.reason}: {c.message}" for c in (pod.status.conditions or [])
                   if c.status == "False" and c.reason == "Unschedulable"]
        reasons += [f"{s.state.waiting.reason}: {s.state.waiting.message}"
                    for s in (pod.status.container_statuses or []) if s.state and s.state.waiting]
        for reason in reasons:
            if (pod.metadata.name, reason) not in seen:
                seen.add((pod.metadata.name, reason))
                log(f"pod {pod.metadata.name} waiting: {reason}")


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
