"""Run one stage as an indexed Kubernetes Job (one pod per node) and stream its logs.

    launcher = KubernetesLauncher(KubernetesLaunchConfig(nodes=2, gpus_per_node=8, ...))
    exit_code = launcher.run(StageCommand("pretrain", [], {}, run_id), log=print)

Exit code: 0 when the Job completes, 2 when a pod exited 2 (podFailurePolicy FailJob),
otherwise the failing pod's exit code (an infra fault).

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

from pipeline.launch.k8s_manifests import (
    COMPLETION_INDEX_ANNOTATION, CONTAINER_NAME, JOB_LABEL, MANAGED_BY, RUN_LABEL,
    KubernetesLaunchConfig, label_value, new_job_name, owner_reference, render_job, render_service,
)

if TYPE_CHECKING:
    from pipeline.launch import StageCommand

ROLE_FILE = "k8s/base/rbac.yaml"
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
# The flow-run pod learns its own Job from the downward API (k8s/base/base-job-template.json).
OWNER_ENVS = ("PIPELINE_OWNER_JOB_NAME", "PIPELINE_OWNER_JOB_UID")


class KubernetesLaunchError(RuntimeError):
    """The API refused a request in a way no retry can fix (RBAC, schema, quota)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class KubernetesApiUnavailable(RuntimeError):
    """The API kept answering 429/5xx or dropping the connection after every retry: infrastructure."""


class LaunchCancelled(Exception):
    """cancel() was called; the Job and its pods have been deleted."""


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
        self.job_name: str | None = None
        self.log: Callable[[str], None] = print

    def _call(self, verb: str, resource: str, fn: Callable, *args, name: str | None = None, **kwargs):
        return call_api(verb, resource, self.cfg.namespace, fn, *args, name=name, attempts=self.cfg.api_attempts,
                        log=self.log, **kwargs)

    def cancel(self) -> None:
        """Ask a running run() to delete its Job and return (thread-safe)."""
        self._cancelled.set()

    def run(self, cmd: "StageCommand", log: Callable[[str], None]) -> int:
        self.log = log
        ns, job_name = self.cfg.namespace, new_job_name(cmd.stage, cmd.run_id)
        job = render_job(self.cfg, job_name, cmd.stage, list(cmd.args), cmd.run_id, dict(cmd.env), self.owner)
        created = self._call("create", "jobs.batch", self.batch.create_namespaced_job, ns, job, name=job_name,
                             on_conflict=lambda: self.batch.read_namespaced_job(job_name, ns))
        self.job_name = job_name
        try:
            self._create_service(job_name, cmd, created.metadata.uid)
            log(f"created Job {ns}/{job_name}: {self.cfg.nodes} node(s) x "
                f"{max(self.cfg.gpus_per_node, 1)} device(s)")
            return self._wait(job_name, log)
        except BaseException:
            # Cancellation, Ctrl-C, or an API error mid-run: no pod may outlive its flow run.
            log(f"deleting Job {ns}/{job_name} and its pods")
            delete_job(self.batch, self.core, ns, job_name, log)
            raise

    def _create_service(self, job_name: str, cmd: "StageCommand", job_uid: str) -> None:
        svc = render_service(self.cfg, job_name, cmd.stage, cmd.run_id)
        # Owned by the Job, so the garbage collector removes it with the Job (TTL included).
        svc["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job",
                                               "name": job_name, "uid": job_uid}]
        self._call("create", "services", self.core.create_namespaced_service, self.cfg.namespace, svc,
                   name=job_name, on_conflict=lambda: None)

    def _wait(self, job_name: str, log: Callable[[str], None]) -> int:
        streams = _LogStreams(self.core, self.cfg.namespace, Path(self.cfg.log_dir) / job_name, log)
        waiting_seen: set[tuple[str, str]] = set()
        while True:
            pods = self._call("list", "pods", self.core.list_namespaced_pod, self.cfg.namespace,
                              label_selector=f"{JOB_LABEL}={job_name}").items
            streams.follow(pods)
            _report_waiting(pods, waiting_seen, log)
            job = self._call("get", "jobs.batch", self.batch.read_namespaced_job,
                             job_name, self.cfg.namespace, name=job_name)
            outcome = _outcome(job, pods)
            if outcome is not None:
                streams.join()
                log(f"Job {job_name} finished: exit code {outcome}")
                return outcome
            if self._cancelled.wait(self.cfg.poll_seconds):
                raise LaunchCancelled(f"stage Job {self.cfg.namespace}/{job_name} cancelled")


def _report_waiting(pods: list[k8s.V1Pod], seen: set[tuple[str, str]], log: Callable[[str], None]) -> None:
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


def _outcome(job: k8s.V1Job, pods: list[k8s.V1Pod]) -> int | None:
    """None while running; else 0, 2 (exit 2 ended it) or the failed pod's exit code."""
    conditions = {c.type: c for c in (job.status.conditions or []) if c.status == "True"}
    if "Complete" in conditions:
        return 0
    if "Failed" not in conditions:
        return None
    codes = [s.state.terminated.exit_code for p in pods for s in (p.status.container_statuses or [])
             if s.name == CONTAINER_NAME and s.state and s.state.terminated
             and s.state.terminated.exit_code]
    if 2 in codes or conditions["Failed"].reason == "PodFailurePolicy":
        return 2
    return codes[-1] if codes else 1


class _LogStreams:
    """One thread per pod: follows its log, prefixes `[rank N] `, keeps a copy on disk."""

    def __init__(self, core: k8s.CoreV1Api, namespace: str, folder: Path, log: Callable[[str], None]):
        self.core, self.namespace, self.folder, self.log = core, namespace, folder, log
        self.threads: dict[str, threading.Thread] = {}
        self.lock = threading.Lock()  # one writer at a time for log() and the files

    def follow(self, pods: Iterable[k8s.V1Pod]) -> None:
        for pod in pods:
            name = pod.metadata.name
            if name in self.threads or pod.status.phase not in ("Running", "Succeeded", "Failed"):
                continue
            rank = (pod.metadata.annotations or {}).get(COMPLETION_INDEX_ANNOTATION, "?")
            thread = threading.Thread(target=self._stream, args=(name, rank), daemon=True)
            self.threads[name] = thread
            thread.start()

    def _stream(self, pod_name: str, rank: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # Append: a replacement pod (same rank, after preemption) continues the same file.
        with open(self.folder / f"rank-{rank}.log", "a", encoding="utf-8") as copy:
            self._emit(copy, f"[rank {rank}] --- pod {pod_name} ---")
            try:
                resp = self.core.read_namespaced_pod_log(
                    pod_name, self.namespace, container=CONTAINER_NAME, follow=True,
                    _preload_content=False)
                for line in _lines(resp.stream(4096)):
                    self._emit(copy, f"[rank {rank}] {line}")
            except Exception as err:  # a log stream must never take the run down with it
                self._emit(copy, f"[rank {rank}] log stream ended: {err}")

    def _emit(self, copy, line: str) -> None:
        with self.lock:
            copy.write(line + "\n")
            copy.flush()
            self.log(line)

    def join(self, timeout: float = 30.0) -> None:
        for thread in self.threads.values():
            thread.join(timeout)


def _lines(chunks: Iterable[bytes]) -> Iterable[str]:
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        yield from (line.decode("utf-8", "replace") for line in complete)
    if buffer:
        yield buffer.decode("utf-8", "replace")


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
