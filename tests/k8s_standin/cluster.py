"""The stand-in's state and controllers: Jobs, Services and Pods, with pods run as local processes.

It mimics the Job controller closely enough for the launcher's contract: indexed pods with
hostname and completion-index annotation, podFailurePolicy rules evaluated in order, a
backoffLimit, activeDeadlineSeconds, ttlSecondsAfterFinished, and deletion with
SIGTERM -> grace period -> SIGKILL and the three propagation policies. Everything runs on
one host, so pod DNS names map to 127.0.0.1 and each Job gets its own free MASTER_PORT
(real pods each have an IP; here they share one).
"""
from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline.localserver import free_port

INDEX_KEY = "batch.kubernetes.io/job-completion-index"
POD_DNS = re.compile(r"^[a-z0-9.-]+\.svc(\.cluster\.local)?$")


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")



@dataclass
class Pod:
    obj: dict
    job_key: tuple[str, str] | None
    index: int
    log_path: Path
    proc: subprocess.Popen | None = None
    kill_at: float | None = None  # SIGKILL deadline once deletion started
    accounted: bool = False  # the Job controller has counted its outcome

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    def finished(self) -> bool:
        return self.obj["status"]["phase"] in ("Succeeded", "Failed")


@dataclass
class JobState:
    obj: dict
    port: int
    failed: int = 0
    completed: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    finished_at: float | None = None


class Cluster:
    def __init__(self, workdir: Path, logdir: Path, secrets: dict[str, dict[str, str]] | None = None,
                 node_labels: dict[str, str] | None = None, gpus: int = 0, max_grace: float = 5.0):
        self.workdir, self.logdir = Path(workdir), Path(logdir)
        self.secrets, self.node_labels, self.gpus = secrets or {}, node_labels or {}, gpus
        self.max_grace = max_grace  # caps terminationGracePeriodSeconds so tests stay quick
        self.lock = threading.RLock()
        self.jobs: dict[tuple[str, str], JobState] = {}
        self.services: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], Pod] = {}
        self.processes: list[subprocess.Popen] = []  # every process ever started, for leak checks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="standin-controller")
        self._thread.start()

    # ---- objects created through the API ------------------------------------------------
    def add_job(self, job: dict) -> dict:
        meta = job["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_iso(), resourceVersion="1")
        job["status"] = {"startTime": now_iso(), "active": 0}
        state = JobState(job, free_port())
        key = (meta["namespace"], meta["name"])
        with self.lock:
            self.jobs[key] = state
            for index in range(job["spec"].get("completions") or 1):
                self._start_pod(key, index)
        return job

    def add_service(self, svc: dict) -> dict:
        svc["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=now_iso())
        with self.lock:
            self.services[(svc["metadata"]["namespace"], svc["metadata"]["name"])] = svc
        return svc

    def delete_job(self, key: tuple[str, str], policy: str | None) -> dict:
        with self.lock:
            state = self.jobs[key]
            # batch/v1 Jobs default to orphaning their pods when no policy is given.
            policy = policy or "Orphan"
            owned = [p for p in self.pods.values() if p.job_key == key]
            if policy == "Orphan":
                for pod in owned:
                    pod.job_key, pod.obj["metadata"]["ownerReferences"] = None, []
            else:
                for pod in owned:
                    self._delete_pod(pod)
                uid = state.obj["metadata"]["uid"]
                for skey, svc in list(self.services.items()):
                    if any(r.get("uid") == uid for r in svc["metadata"].get("ownerReferences", [])):
                        del self.services[skey]
            if policy == "Foreground" and owned:
                # Stays visible until its pods are gone: that is what Foreground promises.
                state.obj["metadata"].update(deletionTimestamp=now_iso(), finalizers=["foregroundDeletion"])
            else:
                del self.jobs[key]
            return state.obj

    # ---- fault injection ------------------------------------------------------------------
    def evict(self, pod_name: str) -> None:
        """Like the Eviction API/preemption: DisruptionTarget condition, then graceful deletion."""
        with self.lock:
            pod = self._pod(pod_name)
            pod.obj["status"].setdefault("conditions", []).append({
                "type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                "message": "Eviction API: evicting", "lastTransitionTime": now_iso()})
            self._delete_pod(pod)

    def kill(self, pod_name: str) -> None:
        """A container crash (OOM kill, segfault): SIGKILL, exit 137, counts toward backoffLimit."""
        with self.lock:
            pod = self._pod(pod_name)
            _signal(pod, signal.SIGKILL)

    def _pod(self, name: str) -> Pod:
        matches = [p for p in self.pods.values() if p.name == name]
        if not matches:
            raise KeyError(f"no pod {name!r}; have {[p.name for p in self.pods.values()]}")
        return matches[0]

    # ---- pods ------------------------------------------------------------------------------
    def _start_pod(self, job_key: tuple[str, str], index: int) -> None:
        job = self.jobs[job_key].obj
        ns, job_name, uid = job_key[0], job_key[1], job["metadata"]["uid"]
        template = copy.deepcopy(job["spec"]["template"])
        name = f"{job_name}-{index}-{uuid.uuid4().hex[:5]}"
        labels = {**template.get("metadata", {}).get("labels", {}),
                  "batch.kubernetes.io/job-name": job_name, "job-name": job_name,
                  "batch.kubernetes.io/controller-uid": uid, "controller-uid": uid, INDEX_KEY: str(index)}
        spec = template["spec"]
        spec["hostname"] = f"{job_name}-{index}"
        obj = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()),
                            "creationTimestamp": now_iso(), "labels": labels,
                            "annotations": {**template.get("metadata", {}).get("annotations", {}),
                                            INDEX_KEY: str(index)},
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                                 "uid": uid, "controller": True, "blockOwnerDeletion": True}]},
               "spec": spec, "status": {"phase": "Pending", "conditions": []}}
        pod = Pod(obj, job_key, index, self.logdir / f"{name}.log")
        self.pods[(ns, name)] = pod
        self._run(pod)

    def _run(self, pod: Pod) -> None:
        """Schedule (node labels, GPUs), resolve env, and start the container's process."""
        spec, status = pod.obj["spec"], pod.obj["status"]
        container = spec["containers"][0]
        gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        selector = spec.get("nodeSelector", {})
        if gpus > self.gpus or any(self.node_labels.get(k) != v for k, v in selector.items()):
            status["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                         "message": f"0/1 nodes are available: needs {gpus} nvidia.com/gpu "
                                                    f"and node labels {selector}"})
            return
        try:
            env = self._env(pod, container)
        except LookupError as err:
            status["containerStatuses"] = [self._cstatus(container, {"waiting": {
                "reason": "CreateContainerConfigError", "message": str(err)}})]
            return
        argv = [_expand(a, env) for a in container.get("command", []) + container.get("args", [])]
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable  # the image's python is this interpreter here
        self.logdir.mkdir(parents=True, exist_ok=True)
        with open(pod.log_path, "wb") as out:
            pod.proc = subprocess.Popen(argv, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(pod.proc)
        status.update(phase="Running", startTime=now_iso(), podIP="127.0.0.1")
        status["conditions"].append({"type": "PodScheduled", "status": "True"})
        status["containerStatuses"] = [self._cstatus(container, {"running": {"startedAt": now_iso()}})]

    @staticmethod
    def _cstatus(container: dict, state: dict) -> dict:
        return {"name": container["name"], "image": container["image"], "imageID": "", "ready": "running" in state,
                "restartCount": 0, "started": "running" in state, "state": state}

    def _env(self, pod: Pod, container: dict) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "PYTEST_"))}
        env["HOSTNAME"] = pod.obj["spec"]["hostname"]
        env["JOB_COMPLETION_INDEX"] = str(pod.index)  # the Job controller sets this in every indexed pod
        for source in container.get("envFrom", []):
            ref = source.get("secretRef", {})
            if ref.get("name") not in self.secrets and not ref.get("optional"):
                raise LookupError(f'secret "{ref.get("name")}" not found')
            env.update(self.secrets.get(ref.get("name"), {}))
        for item in container.get("env", []):
            if "valueFrom" in item:
                env[item["name"]] = _field_ref(pod.obj, item["valueFrom"]["fieldRef"]["fieldPath"])
            else:
                env[item["name"]] = _expand(item.get("value", ""), env)
        if POD_DNS.match(env.get("MASTER_ADDR", "")):
            env["MASTER_ADDR"] = "127.0.0.1"
        if "MASTER_PORT" in env and pod.job_key in self.jobs:
            env["MASTER_PORT"] = str(self.jobs[pod.job_key].port)
        return env

    def _delete_pod(self, pod: Pod) -> None:
        if pod.obj["metadata"].get("deletionTimestamp"):
            return
        grace = pod.obj["spec"].get("terminationGracePeriodSeconds", 30)
        pod.obj["metadata"]["deletionTimestamp"] = now_iso()
        pod.kill_at = time.monotonic() + min(grace, self.max_grace)
        _signal(pod, signal.SIGTERM)

    # ---- controller loop -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            with self.lock:
                self._tick()

    def _tick(self) -> None:
        for key, pod in list(self.pods.items()):
            self._observe(pod)
            if pod.kill_at and time.monotonic() > pod.kill_at:
                _signal(pod, signal.SIGKILL)
        for key, state in list(self.jobs.items()):
            if not state.obj["metadata"].get("deletionTimestamp"):
                self._reconcile(key, state)
        for key, pod in list(self.pods.items()):
            gone = pod.proc is None or pod.proc.poll() is not None
            job = self.jobs.get(pod.job_key) if pod.job_key else None
            # Kept until the Job controller has seen how it ended (an eviction needs a replacement).
            settled = pod.accounted or job is None or job.obj["metadata"].get("deletionTimestamp")
            if pod.obj["metadata"].get("deletionTimestamp") and gone and settled:
                del self.pods[key]
        for key, state in list(self.jobs.items()):
            meta = state.obj["metadata"]
            if meta.get("deletionTimestamp") and not any(p.job_key == key for p in self.pods.values()):
                del self.jobs[key]

    def _observe(self, pod: Pod) -> None:
        if pod.proc is None or pod.finished() or pod.proc.poll() is None:
            return
        code = pod.proc.returncode
        code = 128 - code if code < 0 else code  # killed by signal N -> 128+N, as the kubelet reports
        container = pod.obj["spec"]["containers"][0]
        pod.obj["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        pod.obj["status"]["containerStatuses"] = [self._cstatus(container, {"terminated": {
            "exitCode": code, "reason": "Completed" if code == 0 else "Error",
            "startedAt": pod.obj["status"].get("startTime"), "finishedAt": now_iso()}})]

    def _reconcile(self, key: tuple[str, str], state: JobState) -> None:
        job, spec = state.obj, state.obj["spec"]
        status = job["status"]
        if state.finished_at is not None:
            ttl = spec.get("ttlSecondsAfterFinished")
            if ttl is not None and time.monotonic() - state.finished_at >= ttl:
                self.delete_job(key, "Background")
            return
        for pod in [p for p in self.pods.values() if p.job_key == key and p.finished() and not p.accounted]:
            pod.accounted = True
            if pod.obj["status"]["phase"] == "Succeeded":
                state.completed.add(pod.index)
                continue
            action = _failure_action(spec.get("podFailurePolicy"), pod.obj)
            if action == "FailJob":
                code = pod.obj["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
                return self._finish(state, key, "Failed", "PodFailurePolicy",
                                    f"Container {pod.obj['spec']['containers'][0]['name']} for pod "
                                    f"{pod.obj['metadata']['namespace']}/{pod.name} failed with exit code "
                                    f"{code} matching FailJob rule at index 1")
            if action != "Ignore":
                state.failed += 1
                status["failed"] = state.failed
                if state.failed > spec.get("backoffLimit", 6):
                    return self._finish(state, key, "Failed", "BackoffLimitExceeded",
                                        "Job has reached the specified backoff limit")
            self._start_pod(key, pod.index)  # replacement keeps the index, so the rank
        deadline = spec.get("activeDeadlineSeconds")
        if deadline and time.monotonic() - state.started > deadline:
            return self._finish(state, key, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
        completions = spec.get("completions") or 1
        status["succeeded"] = len(state.completed)
        status["completedIndexes"] = _ranges(sorted(state.completed))
        status["active"] = sum(1 for p in self.pods.values() if p.job_key == key and not p.finished())
        if len(state.completed) >= completions:
            self._finish(state, key, "Complete", None, None)

    def _finish(self, state: JobState, key, kind: str, reason: str | None, message: str | None) -> None:
        state.finished_at = time.monotonic()
        condition = {"type": kind, "status": "True", "lastTransitionTime": now_iso()}
        if reason:
            condition.update(reason=reason, message=message)
        state.obj["status"].update(conditions=[condition], completionTime=now_iso(), active=0)
        for pod in self.pods.values():  # a finished Job's running pods are terminated
            if pod.job_key == key and not pod.finished():
                pod.accounted = True
                self._delete_pod(pod)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self.lock:
            for proc in self.processes:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


def _signal(pod: Pod, sig: int) -> None:
    """Signal the pod's whole process group: Lightning's per-device children die with it."""
    if pod.proc and pod.proc.poll() is None:
        try:
            os.killpg(pod.proc.pid, sig)
        except ProcessLookupError:
            pass


def _failure_action(policy: dict | None, pod: dict) -> str | None:
    """First matching podFailurePolicy rule's action, evaluated in order as the Job controller does."""
    codes = {c["name"]: c["state"]["terminated"]["exitCode"]
             for c in pod["status"].get("containerStatuses", []) if "terminated" in c.get("state", {})}
    conditions = {(c["type"], c["status"]) for c in pod["status"].get("conditions", [])}
    for rule in (policy or {}).get("rules", []):
        on_codes = rule.get("onExitCodes")
        if on_codes:
            wanted = [c for n, c in codes.items() if on_codes.get("containerName") in (None, n) and c != 0]
            hit = [c in on_codes["values"] for c in wanted]
            if (on_codes["operator"] == "In" and any(hit)) or (on_codes["operator"] == "NotIn" and hit and not all(hit)):
                return rule["action"]
        for cond in rule.get("onPodConditions", []):
            if (cond["type"], cond.get("status", "True")) in conditions:
                return rule["action"]
    return None


def _field_ref(pod: dict, path: str) -> str:
    meta = pod["metadata"]
    if path in ("metadata.name", "metadata.namespace", "metadata.uid"):
        return meta[path.split(".")[1]]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return meta.get(match[1], {}).get(match[2], "")
    raise ValueError(f"stand-in cannot resolve fieldRef {path!r}")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


def _ranges(indexes: list[int]) -> str:
    parts, start = [], None
    for i, idx in enumerate(indexes):
        start = idx if start is None else start
        if i + 1 == len(indexes) or indexes[i + 1] != idx + 1:
            parts.append(str(start) if start == idx else f"{start}-{idx}")
            start = None
    return ",".join(parts)
