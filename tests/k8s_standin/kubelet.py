"""The one node: what the kubelet and container runtime do between 'scheduled' and 'exited'.

A pod's process sees only what a real container would: the image's ENV, the container's
`env`/`envFrom` resolved the way the kubelet resolves them, HOSTNAME, and (when the pod
would get a ServiceAccount token) a KUBECONFIG for the stand-in; nothing of the host's
environment. Paths that name places inside the image map to this checkout (WORKDIR), this
interpreter's venv (the image's /opt/venv) and a per-pod folder (/tmp: an emptyDir or the
container's own layer, never shared between pods). A `<host>.<subdomain>.<ns>.svc` name in
the env resolves to 127.0.0.1 only through a headless Service selecting such a pod, as
cluster DNS would; the pod waits for that Service briefly, since the launcher creates it
right after the Job.
"""
from __future__ import annotations

import base64
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.k8s_standin import image as images
from tests.k8s_standin.rules import _quantity
from tests.k8s_standin.store import now_iso

# <hostname>.<subdomain>.<namespace>.svc[.cluster.local]: a pod's DNS name behind a headless Service.
LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
POD_DNS = re.compile(rf"^(?P<host>{LABEL})\.(?P<sub>{LABEL})\.(?P<ns>{LABEL})\.svc(?:\.cluster\.local)?$")


class ConfigError(LookupError):
    """A missing ConfigMap/Secret or key: the container waits in CreateContainerConfigError."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, `$$` is a literal `$`,
    anything else (unknown names included) stays as written."""
    out, i = "", 0
    while i < len(text):
        if text.startswith("$$", i):
            out, i = out + "$", i + 2
            continue
        if text.startswith("$(", i) and text.find(")", i) > 0:
            end = text.find(")", i)
            name = text[i + 2:end]
            out, i = out + (env[name] if name in env else text[i:end + 1]), end + 1
            continue
        out, i = out + text[i], i + 1
    return out


def container_env(pod: dict, container: dict, configmap, secret) -> dict[str, str]:
    """The kubelet's makeEnvironmentVariables: envFrom sources in order, then `env` in order,
    each value expanded against what came before. configmap/secret(name) -> dict | None."""
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        what = "configmap" if "configMapRef" in source else "secret"
        ref = source.get("configMapRef") or source.get("secretRef") or {}
        data = (configmap if what == "configmap" else secret)(ref.get("name"))
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{what} "{ref.get("name")}" not found')
        env.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for item in container.get("env") or []:
        name, source = item["name"], item.get("valueFrom")
        if source is None:
            env[name] = expand(item.get("value", ""), env)
        elif "fieldRef" in source:
            env[name] = field_ref(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[name] = resource_field_ref(container, source["resourceFieldRef"])
        else:
            what = "ConfigMap" if "configMapKeyRef" in source else "Secret"
            ref = source.get("configMapKeyRef") or source["secretKeyRef"]
            data = (configmap if what == "ConfigMap" else secret)(ref.get("name"))
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{what.lower()} "{ref.get("name")}" not found' if data is None
                                  else f"couldn't find key {ref['key']} in {what} {ns}/{ref.get('name')}")
            env[name] = data[ref["key"]]
    return env


def field_ref(pod: dict, path: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta.get("uid"),
              "spec.nodeName": spec.get("nodeName", ""),
              "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
              "status.hostIP": "127.0.0.1", "status.podIP": "127.0.0.1", "status.hostIPs": "127.0.0.1",
              "status.podIPs": "127.0.0.1"}
    if path in simple:
        return simple[path] or ""
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return (meta.get(match[1]) or {}).get(match[2], "")
    raise ConfigError(f"unsupported fieldPath: {path}")


def resource_field_ref(container: dict, ref: dict) -> str:
    kind, _, resource = ref["resource"].partition(".")
    value = _quantity(((container.get("resources") or {}).get(kind) or {}).get(resource, "0")) or 0
    return str(math.ceil(value / (_quantity(ref.get("divisor", "1")) or 1)))


class PathMap:
    """Image paths -> host paths, longest prefix first: /app -> checkout, /tmp -> per-pod folder."""

    def __init__(self, pairs: dict[str, str]):
        self.pairs = sorted(((k.rstrip("/"), v) for k, v in pairs.items() if k.rstrip("/")), key=lambda p: -len(p[0]))

    def __call__(self, path: str) -> str:
        for src, dst in self.pairs:
            if path == src or path.startswith(src + "/"):
                return dst + path[len(src):]
        return path

    def value(self, value: str) -> str:
        """A whole env value, or each entry of a PATH-like list of absolute paths."""
        parts = value.split(":")
        if len(parts) > 1 and all(p.startswith("/") for p in parts):
            return ":".join(self(p) for p in parts)
        return self(value) if value.startswith("/") else value


def image_paths(image_env: dict[str, str], image_workdir: str, workdir: Path, pod_tmp: Path) -> PathMap:
    venv = image_env.get("VIRTUAL_ENV", "/opt/venv")
    return PathMap({"/tmp": str(pod_tmp), image_workdir: str(workdir), f"{venv}/bin": str(Path(sys.executable).parent),
                    venv: sys.prefix})


def kubeconfig(server: str, namespace: str | None = None, user: str | None = None) -> str:
    """A kubeconfig for the stand-in: plain HTTP on loopback. `user` (e.g. the pod's
    `system:serviceaccount:<ns>:<name>`) is sent as the bearer token: not a credential, only a name
    the stand-in records with each request, so tests can check calls against that identity's Role."""
    context = {"cluster": "standin", "user": "standin", **({"namespace": namespace} if namespace else {})}
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "standin",
                           "clusters": [{"name": "standin", "cluster": {"server": server}}],
                           "users": [{"name": "standin", "user": {"token": user} if user else {}}],
                           "contexts": [{"name": "standin", "context": context}]})


@dataclass
class Pod:
    obj: dict
    job_uid: str | None
    index: int | None
    log_path: Path
    proc: subprocess.Popen | None = None
    argv: list[str] | None = None  # what the container was started with, for tests to inspect
    env: dict[str, str] | None = None
    kill_at: float | None = None  # SIGKILL deadline once deletion started
    accounted: bool = False  # the Job controller has counted its outcome
    created: float = field(default_factory=time.monotonic)
    next_try: float = 0.0  # the kubelet retries a pod that cannot start yet
    scheduled: bool = False

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    def finished(self) -> bool:
        return self.obj["status"]["phase"] in ("Succeeded", "Failed")


class _WaitingForDNS(Exception):
    pass


class Kubelet:
    """The one node: schedules (a crude GPU/nodeSelector check), resolves the container's
    config, starts it as a process group and reports how it ended."""

    def __init__(self, cluster):
        self.cluster = cluster
        self._image: tuple = (None, images.ImageConfig())

    def image(self) -> images.ImageConfig:
        """The Dockerfile's final stage, re-read when the file changes (a bad edit keeps the last good one)."""
        path = self.cluster.dockerfile
        try:
            mtime = path.stat().st_mtime if path.exists() else None
            if mtime != self._image[0]:
                self._image = (mtime, images.load(path))
        except Exception:  # noqa: BLE001 - a half-written Dockerfile must not stop the controller
            pass
        return self._image[1]

    def start(self, pod: Pod) -> None:
        status, now = pod.obj["status"], time.monotonic()
        if pod.obj["metadata"].get("deletionTimestamp"):
            status["phase"] = "Failed"  # deleted before its container started
            return
        if now < pod.next_try:
            return
        pod.next_try = now + 0.5
        container = pod.obj["spec"]["containers"][0]
        if not pod.scheduled and not self._schedule(pod, container):
            return
        try:
            argv, env, cwd = self._container_config(pod, container)
        except ConfigError as err:
            return self._waiting(pod, container, "CreateContainerConfigError", str(err))
        except _WaitingForDNS as err:
            return self._waiting(pod, container, "ContainerCreating", str(err))
        except ValueError as err:
            return self._waiting(pod, container, "CreateContainerError", str(err))
        pod.argv, pod.env = argv, env
        try:
            (self.cluster.logdir / "pods" / pod.name / "tmp").mkdir(parents=True, exist_ok=True)
            with open(pod.log_path, "wb") as out:
                pod.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as err:
            # What containerd reports for a missing or non-executable command.
            status.update(phase="Failed", containerStatuses=[cstatus(container, {"terminated": {
                "exitCode": 128, "reason": "StartError", "message": f"failed to create containerd task: "
                f"OCI runtime create failed: unable to start container process: exec: {argv[0]!r}: {err.strerror}",
                "startedAt": "1970-01-01T00:00:00Z", "finishedAt": now_iso()}})])
            return
        self.cluster.processes.append(pod.proc)
        status.update(phase="Running", startTime=status.get("startTime") or now_iso())
        status["containerStatuses"] = [cstatus(container, {"running": {"startedAt": now_iso()}})]

    def observe(self, pod: Pod) -> None:
        if pod.proc is None or pod.finished() or pod.proc.poll() is None:
            return
        code = pod.proc.returncode
        code = 128 - code if code < 0 else code  # killed by signal N -> 128+N, as the kubelet reports
        container = pod.obj["spec"]["containers"][0]
        pod.obj["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        pod.obj["status"]["containerStatuses"] = [cstatus(container, {"terminated": {
            "exitCode": code, "reason": "Completed" if code == 0 else "Error",
            "startedAt": pod.obj["status"].get("startTime"), "finishedAt": now_iso()}})]

    def _schedule(self, pod: Pod, container: dict) -> bool:
        spec, status = pod.obj["spec"], pod.obj["status"]
        gpus = int(((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0))
        selector = spec.get("nodeSelector") or {}
        if gpus > self.cluster.gpus or any(self.cluster.node_labels.get(k) != v for k, v in selector.items()):
            if not status["conditions"]:
                status["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                             "message": f"0/1 nodes are available: needs {gpus} nvidia.com/gpu "
                                                        f"and node labels {selector}"})
            return False
        pod.scheduled = True
        spec["nodeName"] = "standin-node"
        status.update(conditions=[{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()}],
                      hostIP="127.0.0.1", podIP="127.0.0.1", podIPs=[{"ip": "127.0.0.1"}], startTime=now_iso())
        return True

    @staticmethod
    def _waiting(pod: Pod, container: dict, reason: str, message: str) -> None:
        waiting = {"waiting": {"reason": reason, "message": message}}
        pod.obj["status"]["containerStatuses"] = [cstatus(container, waiting)]

    def _container_config(self, pod: Pod, container: dict) -> tuple[list[str], dict[str, str], str]:
        """argv, env and working directory, as the kubelet + runtime would start the container."""
        cluster, ns, spec = self.cluster, pod.obj["metadata"]["namespace"], pod.obj["spec"]
        image = self.image()
        own = container_env(pod.obj, container, lambda n: self._config_map(ns, n), lambda n: self._secret(ns, n))
        job = cluster.jobs.get(pod.job_uid)
        if "MASTER_PORT" in own and job:
            own["MASTER_PORT"] = str(job.port)  # pods share one IP here, so each Job gets its own port
        paths = image_paths(image.env, image.workdir, cluster.workdir, cluster.logdir / "pods" / pod.name / "tmp")
        env = {"HOSTNAME": (spec.get("hostname") or pod.name)[:63], **image.env, **own}
        env = {k: paths.value(v) for k, v in env.items()}
        for key, value in env.items():
            match = POD_DNS.match(value)
            if match and self._resolves(match["host"], match["sub"], match["ns"]):
                env[key] = "127.0.0.1"
            elif match and time.monotonic() - pod.created < cluster.dns_wait:
                raise _WaitingForDNS(f"waiting for headless Service {match['ns']}/{match['sub']} to resolve {value}")
        if cluster.api_url and self._automount(pod.obj):
            sa = spec.get("serviceAccountName") or "default"
            env.setdefault("KUBECONFIG", str(self._kubeconfig(ns, sa)))  # stands in for the ServiceAccount token
        command = [expand(a, own) for a in container.get("command") or []]
        args = [expand(a, own) for a in container.get("args") or []]
        argv = images.container_argv(image, command, args)
        exe = paths(argv[0]) if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH", ""))
        argv[0] = exe or argv[0]  # not found: Popen raises, reported as StartError
        return argv, env, paths(container.get("workingDir") or image.workdir)

    def _resolves(self, host: str, subdomain: str, ns: str) -> bool:
        """Cluster DNS: a headless Service named `subdomain` selecting a pod with that hostname."""
        svc = self.cluster.store.get("services", ns, subdomain)
        selector = (svc or {}).get("spec", {}).get("selector") or {}
        if not svc or svc["spec"].get("clusterIP") != "None" or not selector:
            return False
        return any(p.scheduled and not p.finished() and p.obj["metadata"]["namespace"] == ns
                   and p.obj["spec"].get("hostname") == host and p.obj["spec"].get("subdomain") == subdomain
                   and all((p.obj["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
                   for p in self.cluster.pods.values())

    def _automount(self, pod: dict) -> bool:
        spec = pod["spec"]
        if spec.get("automountServiceAccountToken") is not None:
            return spec["automountServiceAccountToken"]
        sa = self.cluster.store.get("serviceaccounts", pod["metadata"]["namespace"],
                                    spec.get("serviceAccountName") or "default")
        setting = (sa or {}).get("automountServiceAccountToken")
        return True if setting is None else setting

    def _kubeconfig(self, ns: str, service_account: str) -> Path:
        path = self.cluster.logdir / "kubeconfig" / f"{ns}-{service_account}.yaml"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(kubeconfig(self.cluster.api_url, ns, f"system:serviceaccount:{ns}:{service_account}"))
        return path

    def _secret(self, ns: str, name: str) -> dict | None:
        obj = self.cluster.store.get("secrets", ns, name)
        if obj is None:
            return self.cluster.secrets.get(name)
        return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (obj.get("data") or {}).items()}

    def _config_map(self, ns: str, name: str) -> dict | None:
        obj = self.cluster.store.get("configmaps", ns, name)
        return None if obj is None else dict(obj.get("data") or {})


def cstatus(container: dict, state: dict) -> dict:
    return {"name": container["name"], "image": container["image"], "imageID": "", "ready": "running" in state,
            "restartCount": 0, "started": "running" in state, "state": state}


def send_signal(pod: Pod, sig: int) -> None:
    """Signal the pod's whole process group: Lightning's per-device children die with it."""
    if pod.proc and pod.proc.poll() is None:
        try:
            os.killpg(pod.proc.pid, sig)
        except ProcessLookupError:
            pass
