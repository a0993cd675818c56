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

API requests are retried as the API's answer calls for (k8s_api). Any exception while waiting,
KeyboardInterrupt and Prefect's cancellation included, deletes the Job (foreground, so its pods
go first) and its Service before it propagates.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as TransportError

from pipeline.launch import job_status, k8s_api
from pipeline.launch.k8s_api import ROLE_FILE, KubernetesApiUnavailable, KubernetesLaunchError, call_api
from pipeline.launch.k8s_cleanup import delete_job
from pipeline.launch.k8s_manifests import JOB_LABEL, new_job_name, render_job, render_service
from pipeline.launch.k8s_settings import LABEL_PREFIX, KubernetesLaunchConfig
from pipeline.launch.pod_logs import PodLogStreams

if TYPE_CHECKING:
    from pipeline.launch import StageCommand

ATTEMPT_KEY = f"{LABEL_PREFIX}/attempt"  # label and annotation: 1 for the first Job of a stage, 2 after a restart...


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


class KubernetesLauncher:
    """Implements pipeline.launch.Launcher for Kubernetes."""

    def __init__(self, cfg: KubernetesLaunchConfig, api_client: k8s.ApiClient | None = None,
                 owner: dict | None = None):
        self.cfg, self.owner = cfg, owner
        api = api_client or k8s_api.default_api_client()
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
