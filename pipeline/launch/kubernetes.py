"""Run one stage as an indexed Kubernetes Job (one pod per node) and stream its logs.

    launcher = KubernetesLauncher(KubernetesLaunchConfig(nodes=2, gpus_per_node=8, ...))
    exit_code = launcher.run(StageCommand("pretrain", [], {}, run_id), log=print)

Exit code: 0 when the Job completes, 2 when a pod exited 2 (podFailurePolicy FailJob),
otherwise the failing pod's exit code (an infra fault that restarts cannot fix, e.g. the deadline).

The group restarts as one. Each Job is rendered with backoffLimit 0 and a FailJob rule on
DisruptionTarget, so losing any rank (eviction, preemption, node failure, a crash: any exit but
0 and 2) fails the Job and its controller stops the surviving ranks at once, instead of leaving
them in a collective until the DDP timeout. The launcher then deletes that Job (foreground: its
pods are gone first, so two attempts never write one checkpoint) and creates attempt N+1, a new
Job with all ranks, which resumes from the last checkpoint; up to `max_restarts` times (like
JobSet's failurePolicy.maxRestarts). Past that it raises StageRestartsExhausted with one line
naming the cause and the attempt count, and leaves no Job and no pod. `launcher.restarts` lists
the causes. Exit 2 is never restarted.

Pods that cannot start fail fast; pods on their way get their time (job_status.StartWatch). A pod
the kubelet cannot start (ErrImagePull, ImagePullBackOff, InvalidImageName, a missing Secret) or
that no node and no scale-up can take (the cluster-autoscaler's NotTriggerScaleUp, read from the
pod's Events, or no autoscaler event within scale_up_grace_seconds) raises StageCannotStart within
seconds (failure_confirm_seconds), naming rank, pod, reason and message; so does a Job whose pods the
API refuses (FailedCreate: an unknown runtime class, Pod Security). A pod pulling its image or
waiting for a scale-up it triggered may take startup_timeout_seconds; one Pending without progress,
pending_timeout_seconds (StagePendingTimeout). A Job Kueue keeps suspended waits at most
admission_timeout_seconds (StageNotAdmitted). Each deletes the Job first.

API errors are answered as the API means them. 429, 5xx and dropped connections are transient
(an API server restarting, a rate limit): every request is retried with exponential backoff
(Retry-After honoured), creates included, which are made idempotent by name, so one failed
status read never deletes a running Job. RBAC (403) and schema or quota (422) errors raise
KubernetesLaunchError at once, naming verb, resource and object: retrying cannot fix either,
and the flow does not retry them. Any exception while waiting, KeyboardInterrupt and
Prefect's cancellation included, deletes the Job (foreground, so its pods go first) and its
Service before it propagates.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as TransportError

from pipeline.launch import job_status
from pipeline.launch.k8s_manifests import (
    JOB_LABEL, LABEL_PREFIX, MANAGED_BY, RUN_LABEL,
    KubernetesLaunchConfig, label_value, new_job_name, owner_reference, render_job, render_service,
)
from pipeline.launch.pod_logs import PodLogStreams

if TYPE_CHECKING:
    from pipeline.launch import StageCommand

ROLE_FILE = "k8s/base/rbac.yaml"
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
# The flow-run pod learns its own Job from the downward API (k8s/base/base-job-template.json).
OWNER_ENVS = ("PIPELINE_OWNER_JOB_NAME", "PIPELINE_OWNER_JOB_UID")
ATTEMPT_KEY = f"{LABEL_PREFIX}/attempt"  # label and annotation: 1 for the first Job of a stage, 2 after a restart...


class KubernetesLaunchError(RuntimeError):
    """The API refused a request in a way no retry can fix (RBAC, schema, quota)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class KubernetesApiUnavailable(RuntimeError):
    """The API kept answering 429/5xx or dropping the connection after every retry: infrastructure."""


class StagePendingTimeout(KubernetesLaunchError):
    """A pod stayed Pending past its limit: startup_timeout_seconds while pulling or scaling up,
    pending_timeout_seconds without progress. The Job is deleted. Not retried by the flow: the same
    request waits in the same place."""


class StageCannotStart(StagePendingTimeout):
    """A pod can never start as it is (bad image, no pull secret, missing Secret, no node and no scale-up
    for it), seen long enough to be sure; the Job is deleted. Not retried by the flow."""


class StageNotAdmitted(KubernetesLaunchError):
    """Kueue kept the Job suspended past admission_timeout_seconds; the Job is deleted."""


class StageRestartsExhausted(KubernetesLaunchError):
    """Ranks were lost on every one of 1 + max_restarts attempts; nothing is left running.
    Not retried by the flow: the launcher already restarted the group max_restarts times."""

    def __init__(self, message: str, exit_code: int, restarts: list[str]):
        super().__init__(message)
        self.exit_code, self.restarts = exit_code, restarts


class LaunchCancelled(Exception):
    """cancel() was called; the Job and its pods have been deleted."""


VERDICTS = {"cannot start": StageCannotStart, "startup timeout": StagePendingTimeout,
            "pending timeout": StagePendingTimeout, "not admitted": StageNotAdmitted}
EVENTS_EVERY = 4.0  # seconds between two reads of one object's Events


def _explain(err: ApiException, verb: str, resource: str, namespace: str,
             name: str | None = None) -> KubernetesLaunchError:
    try:
        body = json.loads(err.body or "{}")
    except ValueError:
        body = {}
    message = body.get("message") or err.reason
    what = f" ({resource.split('.')[0][:-1]} {name!r})" if name else ""
    if err.status == 403:
        return KubernetesLaunchError(
            f"forbidden: cannot {verb} {resource} in namespace {namespace!r}{what} — check the Role "
            f"pipeline-flow-run in {ROLE_FILE} and that the flow-run pod uses its ServiceAccount "
            f"(API said: {message})", err.status)
    if err.status == 422:
        fields = [c.get("field", "?") for c in body.get("details", {}).get("causes", [])]
        return KubernetesLaunchError(
            f"invalid: the API rejected {verb} {resource} in namespace {namespace!r}{what}; "
            f"field(s) {', '.join(fields) or 'unknown'} (API said: {message})", err.status)
    return KubernetesLaunchError(f"{verb} {resource} in namespace {namespace!r}{what} failed: "
                                 f"HTTP {err.status} {message}", err.status)


def _retry_after(err: ApiException) -> float | None:
    try:
        return float((err.headers or {}).get("Retry-After"))
    except (TypeError, ValueError):
        return None


def call_api(verb: str, resource: str, namespace: str, fn: Callable, *args, name: str | None = None,
             attempts: int = 6, log: Callable[[str], None] = print, on_conflict: Callable | None = None,
             **kwargs):
    """One API request with the retries the API's answer calls for (see the module docstring).

    `on_conflict`: for a create retried after a lost answer, 409 AlreadyExists means the first try
    went through; it returns the existing object instead of failing.
    """
    delay = 0.5
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except ApiException as err:
            if err.status == 409 and attempt > 1 and on_conflict is not None:
                return on_conflict()
            if err.status not in TRANSIENT_STATUS:
                raise _explain(err, verb, resource, namespace, name) from None
            reason, wait = f"HTTP {err.status} {err.reason}", _retry_after(err) or delay
        except TransportError as err:  # connection refused or reset, timeout: nothing was answered
            reason, wait = f"{type(err).__name__}: {err}", delay
        if attempt == attempts:
            raise KubernetesApiUnavailable(f"{verb} {resource} in namespace {namespace!r} failed {attempts} "
                                           f"times; last: {reason}")
        log(f"Kubernetes API: {verb} {resource} answered {reason}; retry {attempt}/{attempts - 1} in {wait:.1f} s")
        time.sleep(wait)
        delay = min(delay * 2, 8.0)


def owner_from_env() -> dict | None:
    """ownerReference to the flow-run Job this process runs in (None outside a flow-run pod)."""
    name, uid = (os.environ.get(key) for key in OWNER_ENVS)
    return owner_reference("Job", name, uid) if name and uid else None


def default_api_client() -> k8s.ApiClient:
    """In-cluster credentials inside a flow-run pod, else the local kubeconfig."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return k8s.ApiClient()


class KubernetesLauncher:
    """Implements pipeline.launch.Launcher for Kubernetes."""

    def __init__(self, cfg: KubernetesLaunchConfig, api_client: k8s.ApiClient | None = None,
                 owner: dict | None = None):
        self.cfg, self.owner = cfg, owner
        api = api_client or default_api_client()
        self.batch, self.core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
        self._cancelled = threading.Event()
        self.job_name: str | None = None  # the current (last) attempt's Job
        self.jobs: list[str] = []  # every attempt's Job, in order
        self.restarts: list[str] = []  # why each restart happened, one line each (for the model card)
        self._streams: PodLogStreams | None = None
        self._events: dict[str, tuple[float, list | None]] = {}  # pod or Job -> (read at, its Events)
        self.log: Callable[[str], None] = print

    def _call(self, verb: str, resource: str, fn: Callable, *args, name: str | None = None, **kwargs):
        return call_api(verb, resource, self.cfg.namespace, fn, *args, name=name, attempts=self.cfg.api_attempts,
                        log=self.log, **kwargs)

    def cancel(self) -> None:
        """Ask a running run() to delete its Job and return (thread-safe)."""
        self._cancelled.set()

    def run(self, cmd: "StageCommand", log: Callable[[str], None]) -> int:
        self.log = log
        self.jobs, self.restarts = [], []
        attempts = self.cfg.max_restarts + 1
        for attempt in range(1, attempts + 1):
            code, cause = self._attempt(cmd, attempt, log)
            if cause is None:  # done: success, exit 2, or a failure no restart can fix
                log(job_status.summary(cmd.stage, code, attempt, self.restarts))
                return code
            where = f"{cause} on attempt {attempt} of {attempts}"
            # The old group must be gone before the new one starts: no two rank 0s on one checkpoint.
            self._delete_and_wait(self.job_name, log)
            if self._streams is not None:  # the stopped ranks' last lines (e.g. a SIGTERM checkpoint)
                self._streams.join(5.0)
            if attempt == attempts:
                message = f"{cmd.stage}: {where}; giving up"
                log(message)
                log(job_status.summary(cmd.stage, code, attempt, self.restarts))
                raise StageRestartsExhausted(message, code, list(self.restarts))
            self.restarts.append(where)
            log(f"restart {attempt}/{self.cfg.max_restarts} of {cmd.stage}: {where}; "
                f"attempt {attempt + 1} (a new Job, all ranks) resumes from the last checkpoint")
        raise AssertionError("unreachable")

    def _attempt(self, cmd: "StageCommand", attempt: int, log: Callable[[str], None]) -> tuple[int, str | None]:
        """One Job with all ranks. (code, None) when finished for good, (code, cause) when a rank was lost."""
        ns, job_name = self.cfg.namespace, new_job_name(cmd.stage, cmd.run_id)
        job = render_job(self.cfg, job_name, cmd.stage, list(cmd.args), cmd.run_id, dict(cmd.env), self.owner)
        job["metadata"].setdefault("labels", {})[ATTEMPT_KEY] = str(attempt)
        job["metadata"].setdefault("annotations", {})[ATTEMPT_KEY] = str(attempt)
        created = self._call("create", "jobs.batch", self.batch.create_namespaced_job, ns, job, name=job_name,
                             on_conflict=lambda: self.batch.read_namespaced_job(job_name, ns))
        self.job_name = job_name
        self.jobs.append(job_name)
        try:
            self._create_service(job_name, cmd, created.metadata.uid)
            log(f"created Job {ns}/{job_name} (attempt {attempt} of {self.cfg.max_restarts + 1}): "
                f"{self.cfg.nodes} node(s) x {max(self.cfg.gpus_per_node, 1)} device(s)")
            return self._wait(job_name, cmd.stage, log)
        except BaseException:
            # Cancellation, Ctrl-C, a pending timeout or an API error mid-run: no pod may outlive its flow run.
            log(f"deleting Job {ns}/{job_name} and its pods")
            delete_job(self.batch, self.core, ns, job_name, log)
            raise

    def _delete_and_wait(self, job_name: str, log: Callable[[str], None]) -> None:
        """Foreground delete, then wait until the Job (and so each of its pods) is gone."""
        ns = self.cfg.namespace
        delete_job(self.batch, self.core, ns, job_name, log)
        deadline = time.monotonic() + self.cfg.termination_grace_seconds + 60
        while time.monotonic() < deadline:
            try:
                self.batch.read_namespaced_job(job_name, ns)
            except ApiException as err:
                if err.status == 404:
                    return
            except TransportError:
                pass
            if self._cancelled.wait(min(self.cfg.poll_seconds, 0.5)):
                raise LaunchCancelled(f"stage Job {ns}/{job_name} cancelled")
        log(f"Job {ns}/{job_name} still terminating after {self.cfg.termination_grace_seconds + 60} s; "
            f"starting the next attempt anyway")

    def _create_service(self, job_name: str, cmd: "StageCommand", job_uid: str) -> None:
        svc = render_service(self.cfg, job_name, cmd.stage, cmd.run_id)
        # Owned by the Job, so the garbage collector removes it with the Job (TTL included).
        svc["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job",
                                               "name": job_name, "uid": job_uid}]
        self._call("create", "services", self.core.create_namespaced_service, self.cfg.namespace, svc,
                   name=job_name, on_conflict=lambda: None)

    def _wait(self, job_name: str, stage: str, log: Callable[[str], None]) -> tuple[int, str | None]:
        streams = self._streams = PodLogStreams(self.core, self.cfg.namespace, Path(self.cfg.log_dir) / job_name, log)
        seen: dict[str, k8s.V1Pod] = {}  # last state of every pod: a lost pod may vanish before the Job fails
        start, self._events = job_status.StartWatch(self.cfg, stage, job_name, log), {}
        while True:
            pods = self._call("list", "pods", self.core.list_namespaced_pod, self.cfg.namespace,
                              label_selector=f"{JOB_LABEL}={job_name}").items
            seen.update((p.metadata.name, p) for p in pods)
            streams.follow(pods)
            job = self._call("get", "jobs.batch", self.batch.read_namespaced_job,
                             job_name, self.cfg.namespace, name=job_name)
            outcome = (job_status.outcome(job, list(seen.values()), job_name)
                       or job_status.early_disruption(pods, job_name))
            if outcome is not None:
                code, cause = outcome
                if cause is None:  # a lost rank's group is joined once deleted: restart without waiting on it
                    streams.join()
                log(f"Job {job_name} finished: exit code {code}" + (f" ({cause})" if cause else ""))
                return outcome
            now = time.monotonic()
            verdict = start.check_job(job, pods, self._events_of, now) or start.check(pods, self._events_of, now)
            if verdict is not None:
                raise VERDICTS[verdict.kind](f"{verdict.message}; Job {self.cfg.namespace}/{job_name} deleted")
            if self._cancelled.wait(self.cfg.poll_seconds):
                raise LaunchCancelled(f"stage Job {self.cfg.namespace}/{job_name} cancelled")

    def _events_of(self, name: str) -> list | None:
        """Events of the pod or Job `name` (scheduler, kubelet, autoscaler, Job controller), read at most every
        EVENTS_EVERY s; None when they cannot be read (the Role lacks `list events`, the API keeps failing)."""
        now, cached = time.monotonic(), self._events.get(name)
        if cached is not None and now - cached[0] < EVENTS_EVERY:
            return cached[1]
        try:
            items = call_api("list", "events", self.cfg.namespace, self.core.list_namespaced_event,
                             self.cfg.namespace, field_selector=f"involvedObject.name={name}", attempts=2,
                             log=self.log).items
        except (KubernetesLaunchError, KubernetesApiUnavailable) as err:
            if cached is None or cached[1] is not None:
                self.log(f"cannot read the Events of {name} ({err}): a scale-up cannot be told from none, so an "
                         f"Unschedulable pod gets pending_timeout_seconds; grant `list events` ({ROLE_FILE})")
            items = None
        self._events[name] = (now, items)
        return items


def delete_job(batch: k8s.BatchV1Api, core: k8s.CoreV1Api, namespace: str, job_name: str,
               log: Callable[[str], None] = print) -> None:
    """Foreground: the Job object stays until its pods are gone, so 'no Job' means 'no pods'."""
    body = k8s.V1DeleteOptions(propagation_policy="Foreground")
    for kind, fn in (("jobs.batch", batch.delete_namespaced_job),
                     ("services", core.delete_namespaced_service)):
        try:  # deleting is idempotent, so transient errors are retried like reads
            call_api("delete", kind, namespace, fn, job_name, namespace, body=body, name=job_name, log=log)
        except (KubernetesLaunchError, KubernetesApiUnavailable) as err:
            if getattr(err, "status", None) != 404:  # already gone is the goal; anything else is worth a line
                log(f"could not delete {kind} {namespace}/{job_name}: {err}")


def delete_jobs_for_run(run_id: str, namespace: str, api_client: k8s.ApiClient | None = None,
                        log: Callable[[str], None] = print) -> list[str]:
    """Delete every stage Job (and Service) of one flow run; returns the Job names."""
    return _delete_where(namespace, api_client, log, lambda labels: labels.get(RUN_LABEL) == label_value(run_id))


def job_run_ids(namespace: str, api_client: k8s.ApiClient | None = None,
                log: Callable[[str], None] = print) -> set[str]:
    """The flow run ids (label values) that launcher Jobs in `namespace` belong to."""
    batch = k8s.BatchV1Api(api_client or default_api_client())
    selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    jobs = call_api("list", "jobs.batch", namespace, batch.list_namespaced_job, namespace,
                    label_selector=selector, log=log).items
    return {(j.metadata.labels or {}).get(RUN_LABEL) for j in jobs} - {None}


def stop_jobs_of_run(run_id: str, namespace: str, timeout_s: float, api_client: k8s.ApiClient | None = None,
                     log: Callable[[str], None] = print) -> list[str]:
    """Delete the flow run's stage Jobs and wait until they are gone: Foreground deletion keeps a Job until
    its pods have ended, so afterwards no pod of theirs can write. Raises KubernetesLaunchError past timeout_s."""
    api = api_client or default_api_client()
    doomed = delete_jobs_for_run(run_id, namespace, api, log)
    deadline = time.monotonic() + timeout_s
    while doomed and label_value(run_id) in job_run_ids(namespace, api, log):
        if time.monotonic() > deadline:
            raise KubernetesLaunchError(f"the previous attempt's Jobs {doomed} in {namespace} were still there "
                                        f"{timeout_s:g} s after their deletion")
        time.sleep(1.0)
    return doomed


def cleanup_orphans(namespace: str, flow_run_ids_alive: Iterable[str],
                    api_client: k8s.ApiClient | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Delete launcher Jobs whose flow run is no longer alive (crashed worker or flow)."""
    alive = {label_value(r) for r in flow_run_ids_alive}
    return _delete_where(namespace, api_client, log, lambda labels: labels.get(RUN_LABEL) not in alive)


def _delete_where(namespace, api_client, log, wanted: Callable[[dict], bool]) -> list[str]:
    api = api_client or default_api_client()
    batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    jobs = call_api("list", "jobs.batch", namespace, batch.list_namespaced_job, namespace,
                    label_selector=selector, log=log).items
    doomed = [j.metadata.name for j in jobs if wanted(j.metadata.labels or {})]
    for name in doomed:
        log(f"deleting orphaned Job {namespace}/{name}")
        delete_job(batch, core, namespace, name, log)
    return doomed
