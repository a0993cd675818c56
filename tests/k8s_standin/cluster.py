"""The stand-in's controllers: Job controller, garbage collector and a kubelet that runs each
pod's container as a local process.

It mimics the Job controller closely enough for the launcher's contract: indexed pods with
hostname and completion-index annotation, at most `parallelism` active pods,
podFailurePolicy rules evaluated in order, backoffLimit, activeDeadlineSeconds and
ttlSecondsAfterFinished. Deletion sends SIGTERM, waits the grace period, then SIGKILL;
dependents go by ownerReferences (Background, Foreground, Orphan) as the garbage collector
does. Everything runs on one host: a pod's DNS name maps to 127.0.0.1 once its headless
Service exists, and each Job gets its own free MASTER_PORT (real pods each have an IP).
"""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.k8s_standin import dns
from tests.k8s_standin.kubelet import Kubelet, NodeSettings, Pod, send_signal
from tests.k8s_standin.podnet import PodNetwork
from tests.k8s_standin.store import Store, now_iso, random_suffix

INDEX_KEY = "batch.kubernetes.io/job-completion-index"


@dataclass
class JobState:
    obj: dict
    failed: int = 0
    succeeded: int = 0  # NonIndexed; Indexed Jobs count `completed` indexes
    completed: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    finished_at: float | None = None  # when the terminal condition (Complete/Failed) went in: TTL counts from it
    target: dict | None = None  # FailureTarget or SuccessCriteriaMet, once the Job's outcome is decided
    refused: bool = False  # pod creation refused at admission (reported once, as an Event on the Job)


class Cluster:
    def __init__(self, logdir: Path, secrets: dict[str, dict[str, str]] | None = None,
                 node: NodeSettings | None = None, max_grace: float | None = None):
        self.logdir = Path(logdir)
        # Seeded Secrets (name -> {key: value}), visible in every namespace; API-created ones win.
        self.secrets = secrets or {}
        # None: every pod gets its terminationGracePeriodSeconds (or the DeleteOptions' grace) in full,
        # as the kubelet gives it; a number caps it, only for callers that ask for that explicitly.
        self.max_grace = max_grace
        self.node = node or NodeSettings()
        self.net = PodNetwork()  # pods' own network namespaces; the node's address serves DNS and the API
        self.net.serve_udp(53, dns.handler(self.node.cluster_domain, self._resolve))
        self.api_url: str | None = None  # the API as pods reach it (serve_api): pods with a token get a kubeconfig
        self.lock = threading.RLock()
        self.store = Store(self.lock)
        self.jobs: dict[str, JobState] = {}  # by Job uid
        self.pods: dict[tuple[str, str], Pod] = {}
        self.processes: list[subprocess.Popen] = []  # every process ever started, for leak checks
        self.kubelet = Kubelet(self, self.node, self.net)
        self._seen: dict[str, str] = {}  # uid -> last published status, to emit MODIFIED events
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="standin-controller")
        self._thread.start()

    # ---- objects created and deleted through the API -----------------------------------
    def create(self, plural: str, obj: dict) -> dict:
        with self.lock:
            self.store.add(plural, obj)
            if plural == "jobs":
                obj["status"] = {"startTime": now_iso(), "active": 0}
                state = JobState(obj)
                self.jobs[obj["metadata"]["uid"]] = state
                self._reconcile(state)  # pods exist as soon as the create call returns
            return obj

    def delete(self, plural: str, ns: str, name: str, policy: str | None = None,
               grace: int | None = None) -> tuple[dict, bool]:
        """Delete like the API server + garbage collector; returns (object, gone already)."""
        with self.lock:
            obj = self.store.get(plural, ns, name)
            if obj is None:
                raise KeyError(name)
            meta, uid = obj["metadata"], obj["metadata"]["uid"]
            # batch/v1 Jobs still default to orphaning their pods; everything else to Background.
            policy = policy or ("Orphan" if plural == "jobs" else "Background")
            if plural == "namespaces":
                return self._delete_namespace(obj), False
            if policy == "Orphan":
                for dep_plural, dep in self.store.dependents(ns, uid):
                    self._drop_owner(dep_plural, dep, uid)
            elif not meta.get("deletionTimestamp"):
                for dep_plural, dep in self.store.dependents(ns, uid):
                    self._collect(dep_plural, dep, uid)
            if plural == "pods":
                self._delete_pod(self.pods[(ns, name)], grace)
                return obj, False
            blockers = [d for _, d in self.store.dependents(ns, uid) if _blocks(d, uid)]
            if policy == "Foreground" and blockers:
                # Stays visible until its blocking dependents are gone: what Foreground promises.
                meta.setdefault("deletionTimestamp", now_iso())
                meta["finalizers"] = sorted(set(meta.get("finalizers") or []) | {"foregroundDeletion"})
                self.store.touch(plural, obj)
                return obj, False
            self._remove(plural, obj)
            return obj, True

    def _collect(self, plural: str, obj: dict, owner_uid: str) -> None:
        """The garbage collector's step for one dependent of a deleted owner."""
        others = [r for r in obj["metadata"].get("ownerReferences") or []
                  if r.get("uid") != owner_uid and self.store.find_uid(r.get("uid"))]
        if others:  # still owned by someone alive: only the dangling reference goes
            self._drop_owner(plural, obj, owner_uid)
        elif not obj["metadata"].get("deletionTimestamp"):
            self.delete(plural, obj["metadata"].get("namespace", ""), obj["metadata"]["name"], "Background")

    def _drop_owner(self, plural: str, obj: dict, owner_uid: str) -> None:
        refs = obj["metadata"].get("ownerReferences") or []
        obj["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != owner_uid]
        if plural == "pods":
            self.pods[(obj["metadata"]["namespace"], obj["metadata"]["name"])].job_uid = None
        self.store.touch(plural, obj)

    def _remove(self, plural: str, obj: dict) -> None:
        meta = obj["metadata"]
        self.store.remove(plural, obj)
        self._seen.pop(meta["uid"], None)
        if plural == "jobs":
            self.jobs.pop(meta["uid"], None)
        elif plural == "pods":
            self.pods.pop((meta["namespace"], meta["name"]), None)

    def _delete_namespace(self, ns_obj: dict) -> dict:
        name = ns_obj["metadata"]["name"]
        ns_obj["metadata"].setdefault("deletionTimestamp", now_iso())
        ns_obj["status"] = {"phase": "Terminating"}
        self.store.touch("namespaces", ns_obj)
        for (plural, ns, obj_name), _ in list(self.store.objects.items()):
            if ns == name and self.store.get(plural, ns, obj_name) is not None:
                self.delete(plural, ns, obj_name, "Background")
        return ns_obj

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
            send_signal(self._pod(pod_name), signal.SIGKILL)

    def _pod(self, name: str) -> Pod:
        matches = [p for p in self.pods.values() if p.name == name]
        if not matches:
            raise KeyError(f"no pod {name!r}; have {[p.name for p in self.pods.values()]}")
        return matches[0]

    # ---- the Job controller -------------------------------------------------------------------
    def _create_pod(self, state: JobState, index: int | None) -> None:
        job = state.obj
        ns, job_name, uid = job["metadata"]["namespace"], job["metadata"]["name"], job["metadata"]["uid"]
        runtime_class = job["spec"]["template"]["spec"].get("runtimeClassName")
        if runtime_class and runtime_class not in self.node.runtime_classes:
            # The RuntimeClass admission plugin refuses the pod; the Job controller reports it on the Job.
            if not state.refused:
                state.refused = True
                self.record_event(ns, {
                    "apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": "FailedCreate",
                    "message": f'Error creating: pods "{job_name}-" is forbidden: pod rejected: RuntimeClass '
                               f'"{runtime_class}" not found',
                    "metadata": {"name": f"{job_name}.{random_suffix(8)}", "namespace": ns},
                    "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "namespace": ns,
                                       "uid": uid},
                    "source": {"component": "job-controller"}, "firstTimestamp": now_iso(),
                    "lastTimestamp": now_iso(), "count": 1})
            return
        template = json.loads(json.dumps(job["spec"]["template"]))
        tmeta, spec = template.get("metadata") or {}, template["spec"]
        labels, annotations = dict(tmeta.get("labels") or {}), dict(tmeta.get("annotations") or {})
        prefix = f"{job_name}-"
        if index is not None:
            labels[INDEX_KEY] = annotations[INDEX_KEY] = str(index)
            spec["hostname"] = spec.get("hostname") or f"{job_name}-{index}"
            prefix = f"{job_name}-{index}-"
            for container in spec.get("initContainers", []) + spec["containers"]:
                env = container.setdefault("env", [])
                if not any(e["name"] == "JOB_COMPLETION_INDEX" for e in env):
                    env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                        "fieldPath": f"metadata.annotations['{INDEX_KEY}']"}}})
        name = prefix[:58] + random_suffix()
        obj = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "generateName": prefix, "namespace": ns, "labels": labels,
                            "annotations": annotations,
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                                 "uid": uid, "controller": True, "blockOwnerDeletion": True}]},
               "spec": spec, "status": {"phase": "Pending", "conditions": []}}
        self.store.add("pods", obj)
        self.pods[(ns, name)] = Pod(obj, uid, index, self.logdir / f"{name}.log")

    def _reconcile(self, state: JobState) -> None:
        """One pass of the Job controller's syncJob (pkg/controller/job/job_controller.go) as Kubernetes
        1.31+ runs it: once the outcome is decided, the interim condition goes in first (FailureTarget,
        or SuccessCriteriaMet), every pod still active is deleted gracefully and none is created; the
        terminal Failed (same reason and message) or Complete (with completionTime, which a failed Job
        never gets) is added only when no pod of the Job is left terminating."""
        job, spec, status = state.obj, state.obj["spec"], state.obj["status"]
        uid, indexed = job["metadata"]["uid"], spec.get("completionMode") == "Indexed"
        if state.finished_at is not None:
            ttl = spec.get("ttlSecondsAfterFinished")
            if ttl is not None and time.monotonic() - state.finished_at >= ttl:
                self.delete("jobs", job["metadata"]["namespace"], job["metadata"]["name"], "Background")
            return
        pods = [p for p in self.pods.values() if p.job_uid == uid]
        fail_job = None  # getFailJobMessage: the first failed pod matching a FailJob rule
        for pod in [p for p in pods if p.finished() and not p.accounted]:
            pod.accounted = True
            if pod.obj["status"]["phase"] == "Succeeded":
                if indexed:
                    state.completed.add(pod.index)
                else:
                    state.succeeded += 1
                continue
            action, message = _failure_action(spec.get("podFailurePolicy"), pod.obj)
            fail_job = fail_job or (message if action == "FailJob" else None)
            if action != "Ignore":
                state.failed += 1
        if state.failed:
            status["failed"] = state.failed
        if state.target is None:
            deadline = spec.get("activeDeadlineSeconds")
            if fail_job:
                state.target = _condition("FailureTarget", "PodFailurePolicy", fail_job)
            elif state.failed > spec.get("backoffLimit", 6):
                state.target = _condition("FailureTarget", "BackoffLimitExceeded",
                                          "Job has reached the specified backoff limit")
            elif deadline is not None and not spec.get("suspend") and time.monotonic() - state.started >= deadline:
                state.target = _condition("FailureTarget", "DeadlineExceeded",
                                          "Job was active longer than specified deadline")
        # Active pods exclude terminating ones (FilterActivePods); those are counted apart.
        active = [p for p in pods if not p.finished() and not p.obj["metadata"].get("deletionTimestamp")]
        completions, parallelism = spec.get("completions"), spec.get("parallelism", 1)
        succeeded = len(state.completed) if indexed else state.succeeded
        status["succeeded"] = succeeded
        if indexed:
            status["completedIndexes"] = _ranges(sorted(state.completed))
        if state.target is None and ((completions is not None and succeeded >= completions and not active)
                                     or (completions is None and succeeded and not active)):
            state.target = _condition("SuccessCriteriaMet", "CompletionsReached",
                                      "Reached expected number of succeeded pods")
        if state.target is not None:
            return self._conclude(state, pods)
        terminating = [p for p in pods if not p.finished() and p.obj["metadata"].get("deletionTimestamp")]
        status.update(active=len(active), terminating=len(terminating),
                      ready=sum(1 for p in active if p.obj["status"]["phase"] == "Running"))
        if spec.get("suspend"):
            return
        # onlyReplaceFailedPods: with podReplacementPolicy Failed (the API's default when a
        # podFailurePolicy is set) a terminating pod still holds its slot until it has failed.
        hold = spec.get("podReplacementPolicy") == "Failed" or spec.get("podFailurePolicy") is not None
        room = max(0, parallelism - len(active) - (len(terminating) if hold else 0))
        if indexed:
            busy = {p.index for p in active}
            for index in [i for i in range(completions) if i not in state.completed and i not in busy][:room]:
                self._create_pod(state, index)
        elif not (completions is None and succeeded):
            wanted = room if completions is None else min(room, completions - succeeded - len(active))
            for _ in range(max(0, wanted)):
                self._create_pod(state, None)

    def _conclude(self, state: JobState, pods: list[Pod]) -> None:
        """The outcome is decided (state.target): delete what is still active and start nothing; once no
        pod is left terminating, add the terminal condition (trackJobStatusAndRemoveFinalizers,
        enactJobFinished)."""
        status, failing = state.obj["status"], state.target["type"] == "FailureTarget"
        for pod in pods:
            if pod.finished() or pod.accounted:
                continue
            pod.accounted = True  # its outcome is settled now: the pod may go once it has exited
            # "When the job is considered finished, every non-terminated pod is considered failed."
            if failing and _failure_action(state.obj["spec"].get("podFailurePolicy"), pod.obj)[0] != "Ignore":
                state.failed += 1
                status["failed"] = state.failed
            self._delete_pod(pod)
        terminating = [p for p in pods if not p.finished()]
        status.update(active=0, ready=0, terminating=len(terminating))
        conditions = status.setdefault("conditions", [])
        if not any(c["type"] == state.target["type"] for c in conditions):
            conditions.append(state.target)
        if not terminating:
            self._finish(state)

    def _finish(self, state: JobState) -> None:
        """The terminal condition, with the interim one's reason and message: Failed after FailureTarget,
        Complete after SuccessCriteriaMet; only Complete gets a completionTime (enactJobFinished)."""
        kind = "Failed" if state.target["type"] == "FailureTarget" else "Complete"
        condition = _condition(kind, state.target["reason"], state.target["message"])
        state.obj["status"]["conditions"].append(condition)
        if kind == "Complete":
            state.obj["status"]["completionTime"] = condition["lastTransitionTime"]
        state.finished_at = time.monotonic()

    def _delete_pod(self, pod: Pod, grace: int | None = None) -> None:
        if pod.obj["metadata"].get("deletionTimestamp"):
            return
        grace = pod.obj["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else grace
        pod.obj["metadata"].update(deletionTimestamp=now_iso(), deletionGracePeriodSeconds=grace)
        pod.kill_at = time.monotonic() + (grace if self.max_grace is None else min(grace, self.max_grace))
        send_signal(pod, signal.SIGTERM)

    # ---- controller loop -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            with self.lock:
                self._tick()

    def _tick(self) -> None:
        for pod in list(self.pods.values()):
            if pod.proc is None and not pod.finished():
                self.kubelet.start(pod)
            self.kubelet.observe(pod)
            if pod.kill_at and time.monotonic() > pod.kill_at:
                send_signal(pod, signal.SIGKILL)
        for state in list(self.jobs.values()):
            if not state.obj["metadata"].get("deletionTimestamp"):
                self._reconcile(state)
        for pod in list(self.pods.values()):
            gone = pod.proc is None or pod.proc.poll() is not None
            job = self.jobs.get(pod.job_uid)
            # Kept until the Job controller has seen how it ended (an eviction needs a replacement).
            settled = pod.accounted or job is None or job.obj["metadata"].get("deletionTimestamp")
            if pod.obj["metadata"].get("deletionTimestamp") and gone and settled:
                self._remove("pods", pod.obj)
        self._garbage_collect()
        published = [("pods", p.obj) for p in self.pods.values()] + [("jobs", s.obj) for s in self.jobs.values()]
        for plural, obj in published:  # controller-made changes reach watchers as MODIFIED events
            seen = json.dumps([obj.get("status"), obj["metadata"].get("deletionTimestamp")], sort_keys=True)
            if self._seen.get(obj["metadata"]["uid"]) != seen:
                self._seen[obj["metadata"]["uid"]] = seen
                self.store.touch(plural, obj)

    def _garbage_collect(self) -> None:
        uids = {o["metadata"]["uid"]: o for o in self.store.objects.values()}
        for (plural, ns, name), obj in list(self.store.objects.items()):
            meta = obj["metadata"]
            if self.store.get(plural, ns, name) is not obj:
                continue  # went earlier in this pass
            refs = meta.get("ownerReferences") or []
            owners = [r for r in refs if r.get("uid") in uids
                      and uids[r["uid"]]["metadata"].get("namespace", "") in (ns, "")]
            if refs and not owners and not meta.get("deletionTimestamp"):
                self.delete(plural, ns, name, "Background")  # its owner never existed or is gone
            elif "foregroundDeletion" in (meta.get("finalizers") or []):
                if not any(_blocks(d, meta["uid"]) for _, d in self.store.dependents(ns, meta["uid"])):
                    self._remove(plural, obj)
            elif plural == "namespaces" and meta.get("deletionTimestamp"):
                if not any(n == name for (_, n, _) in self.store.objects):
                    self._remove(plural, obj)

    def serve_api(self, port: int) -> None:
        """The API server on the host's 127.0.0.1:port, as pods reach it: at the node address."""
        self.api_url = f"http://{self.net.expose(port)}"

    def _resolve(self, host: str, subdomain: str, ns: str) -> str | None:
        return self.kubelet.resolve(host, subdomain, ns)

    def record_event(self, ns: str, event: dict) -> None:
        self.store.add("events", event)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self.lock:
            for proc in self.processes:  # SIGKILL to a shim ends its whole container
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            for pod in self.pods.values():
                self.kubelet.release(pod)
        self.net.close()


def _blocks(dependent: dict, owner_uid: str) -> bool:
    return any(r.get("uid") == owner_uid and r.get("blockOwnerDeletion")
               for r in dependent["metadata"].get("ownerReferences") or [])


def _exit_codes(pod: dict) -> dict[str, int]:
    return {c["name"]: c["state"]["terminated"]["exitCode"]
            for c in pod["status"].get("containerStatuses", []) if "terminated" in c.get("state", {})}


def _failure_action(policy: dict | None, pod: dict) -> tuple[str | None, str | None]:
    """matchPodFailurePolicy (pkg/controller/job/pod_failure_policy.go): the first matching rule, in
    order -> (action, its FailJob message as the Job controller words it)."""
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    for i, rule in enumerate((policy or {}).get("rules", [])):
        action, on_codes = rule["action"], rule.get("onExitCodes")
        if on_codes:
            for container, code in _exit_codes(pod).items():
                if on_codes.get("containerName") not in (None, container) or code == 0:
                    continue
                operator, listed = on_codes["operator"], code in on_codes["values"]
                if (operator == "In" and listed) or (operator == "NotIn" and not listed):
                    return action, (f"Container {container} for pod {ns}/{name} failed with exit code {code} "
                                    f"matching {action} rule at index {i}")
        elif rule.get("onPodConditions"):
            for cond in pod["status"].get("conditions", []):
                for pattern in rule["onPodConditions"]:
                    if (cond["type"], cond.get("status")) == (pattern["type"], pattern.get("status", "True")):
                        return action, (f"Pod {ns}/{name} has condition {cond['type']} matching {action} "
                                        f"rule at index {i}")
    return None, None


def _condition(kind: str, reason: str, message: str) -> dict:
    now = now_iso()
    return {"type": kind, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": now, "lastTransitionTime": now}


def _ranges(indexes: list[int]) -> str:
    parts, start = [], None
    for i, idx in enumerate(indexes):
        start = idx if start is None else start
        if i + 1 == len(indexes) or indexes[i + 1] != idx + 1:
            parts.append(str(start) if start == idx else f"{start}-{idx}")
            start = None
    return ",".join(parts)
