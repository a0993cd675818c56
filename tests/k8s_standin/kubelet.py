"""The node: scheduling (with an optional autoscaled GPU pool), the pod sandbox (its own network
namespace and address), image pulls with a registry's failures and a configured delay, and the
container itself, made by buildah from the image `make image` built and run by the shim.

A pod's process sees only what a real container would: the image's filesystem, user, ENV and
WORKDIR; the container's `env`/`envFrom` resolved as the kubelet resolves them; its volumes; its own
hostname, /etc/hosts and a resolv.conf pointing at the stand-in's cluster DNS; and (when the pod would
get a ServiceAccount token) a KUBECONFIG for the stand-in's API at the node address. Nothing of the
host's environment, venv or checkout.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.k8s_standin import dns, podspec, runtime
from tests.k8s_standin.image import container_argv
from tests.k8s_standin.podspec import ConfigError, container_env, kubeconfig
from tests.k8s_standin.store import now_iso

SHIM = str(Path(__file__).with_name("shim.py"))  # run by path: the host-side runtime, not the image
BACKOFF_SECONDS = 2.0  # between pull retries (the kubelet's starts at 10 s and doubles)


@dataclass
class NodeSettings:
    """What the stand-in's node is and has. Defaults: one CPU node, no delays."""
    images: dict[str, str] = field(default_factory=dict)  # registry: reference -> local image
    private_registries: set[str] = field(default_factory=set)  # hosts that need an imagePullSecret
    pull_seconds: float = 0.0  # first pull of an image on a node (a 6-7 GiB CUDA image: minutes)
    # True: every pod lands on a node without the image (a multi-node cluster after a node is lost):
    # each pod pays pull_seconds. False: one node, each image pulled once.
    pull_per_pod: bool = False
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    # An autoscaled node pool: a pod that fits it but no existing node gets a node after provision_seconds.
    pool_gpus: int = 0
    pool_labels: dict[str, str] = field(default_factory=dict)
    provision_seconds: float = 0.0
    cluster_domain: str = "cluster.local"
    # RuntimeClass objects the cluster has: a pod naming another is rejected at admission (no pod).
    runtime_classes: set[str] = field(default_factory=lambda: {"nvidia"})


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
    sandbox: tuple[str, str] | None = None  # (network namespace, pod IP)
    container: str | None = None  # buildah working container
    pull_failures: int = 0
    events: set[str] = field(default_factory=set)  # reasons already reported

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    @property
    def key(self) -> str:
        return self.obj["metadata"]["uid"][:12]

    def finished(self) -> bool:
        return self.obj["status"]["phase"] in ("Succeeded", "Failed")


class Kubelet:
    def __init__(self, cluster, settings: NodeSettings, net):
        self.cluster, self.settings, self.net = cluster, settings, net
        self.registry = runtime.Registry(settings.images, settings.private_registries)
        self.pulls = runtime.Pulls(settings.pull_seconds)
        self.containers = runtime.Containers()
        self.scale_up_at: float | None = None  # when the autoscaled node is ready

    # ---- the pod's way to Running ----------------------------------------------------------------
    def start(self, pod: Pod) -> None:
        status, now = pod.obj["status"], time.monotonic()
        if pod.obj["metadata"].get("deletionTimestamp"):
            status["phase"] = "Failed"  # deleted before its container started
            self.release(pod)  # its sandbox (and a container made for a start that failed) go with it
            return
        if now < pod.next_try:
            return
        pod.next_try = now + 0.25
        container = pod.obj["spec"]["containers"][0]
        if not pod.scheduled and not self._schedule(pod, container):
            return
        if pod.sandbox is None:
            pod.sandbox = self.net.add_pod(pod.key)
            status.update(podIP=pod.sandbox[1], podIPs=[{"ip": pod.sandbox[1]}])
        try:
            local = self.registry.resolve(container["image"], self._pull_auths(pod.obj))
        except runtime.PullError as err:
            return self._pull_failed(pod, container, err)
        if not self.pulls.ready(pod.key if self.settings.pull_per_pod else local):
            self._event(pod, "Pulling", f'Pulling image "{container["image"]}"')
            return self._waiting(pod, container, "ContainerCreating", "")
        self._event(pod, "Pulled", f'Successfully pulled image "{container["image"]}"')
        try:
            spec = self._container_spec(pod, container, local)
        except ConfigError as err:
            return self._waiting(pod, container, "CreateContainerConfigError", str(err))
        except ValueError as err:
            return self._waiting(pod, container, "CreateContainerError", str(err))
        spec_path = self.cluster.logdir / "pods" / pod.name / "container.json"
        spec_path.write_text(json.dumps(spec))
        with open(pod.log_path, "wb") as out:
            pod.proc = subprocess.Popen([sys.executable, SHIM, str(spec_path)],
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, cwd="/")
        self.cluster.processes.append(pod.proc)
        status.update(phase="Running", startTime=status.get("startTime") or now_iso())
        status["containerStatuses"] = [cstatus(container, {"running": {"startedAt": now_iso()}})]

    def observe(self, pod: Pod) -> None:
        if pod.proc is None or pod.finished() or pod.proc.poll() is None:
            return
        code = pod.proc.returncode
        code = 128 - code if code < 0 else code  # the shim killed by signal N -> 128+N, as the kubelet reports
        container = pod.obj["spec"]["containers"][0]
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                      "startedAt": pod.obj["status"].get("startTime"), "finishedAt": now_iso()}
        log = pod.log_path.read_text(errors="replace") if pod.log_path.exists() else ""
        if code == 128 and "standin-shim: unable to start container process" in log:
            message = log.split("standin-shim: ", 1)[1].strip()
            terminated.update(reason="StartError", message=f"failed to create containerd task: OCI runtime create "
                                                            f"failed: runc create failed: {message}")
        pod.obj["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        pod.obj["status"]["containerStatuses"] = [cstatus(container, {"terminated": terminated})]
        self.release(pod)

    def release(self, pod: Pod) -> None:
        """The container and the sandbox go once the process has ended (its log stays for `kubectl logs`)."""
        if pod.container:
            self.containers.remove(pod.container)
            pod.container = None
        if pod.sandbox:
            self.net.remove_pod(pod.key)
            pod.sandbox = None

    # ---- scheduling, with a cluster autoscaler's decisions ------------------------------------------
    def _schedule(self, pod: Pod, container: dict) -> bool:
        spec, status, s = pod.obj["spec"], pod.obj["status"], self.settings
        gpus = int(((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0))
        selector = spec.get("nodeSelector") or {}
        fits_node = gpus <= s.gpus and all(s.labels.get(k) == v for k, v in selector.items())
        fits_pool = s.provision_seconds > 0 and gpus <= s.pool_gpus and all(
            s.pool_labels.get(k) == v for k, v in selector.items())
        if not fits_node and fits_pool and self.scale_up_at is not None and time.monotonic() >= self.scale_up_at:
            fits_node = True  # the new node has joined
        if not fits_node:
            # The default scheduler's wording (one node here).
            why = "1 node(s) didn't match Pod's node affinity/selector" if any(
                s.labels.get(k) != v for k, v in selector.items()) else "1 Insufficient nvidia.com/gpu"
            message = (f"0/1 nodes are available: {why}. preemption: 0/1 nodes are available: "
                       f"1 Preemption is not helpful for scheduling.")
            status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": message, "lastTransitionTime": now_iso()}]
            self._event(pod, "FailedScheduling", message, kind="Warning", source="default-scheduler")
            if fits_pool:
                if self.scale_up_at is None:
                    self.scale_up_at = time.monotonic() + s.provision_seconds
                self._event(pod, "TriggeredScaleUp", "pod triggered scale-up: [{gpu-pool 0->1 (max: 1)}]",
                            source="cluster-autoscaler")
            elif s.provision_seconds > 0:
                self._event(pod, "NotTriggerScaleUp", f"pod didn't trigger scale-up: 1 {why.split(' ', 1)[1]}",
                            kind="Warning", source="cluster-autoscaler")
            return False
        pod.scheduled = True
        spec["nodeName"] = "standin-node"
        status.update(conditions=[{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()}],
                      hostIP=self.net.node_ip, startTime=now_iso())
        self._event(pod, "Scheduled", f"Successfully assigned {pod.obj['metadata']['namespace']}/{pod.name} to "
                                      f"standin-node", source="default-scheduler")
        return True

    # ---- pulls ----------------------------------------------------------------------------------------
    def _pull_auths(self, pod: dict) -> set[str]:
        """Registry hosts the pod's imagePullSecrets hold credentials for (dockerconfigjson `auths`)."""
        hosts: set[str] = set()
        for ref in pod["spec"].get("imagePullSecrets") or []:
            obj = self.cluster.store.get("secrets", pod["metadata"]["namespace"], ref.get("name"))
            data = podspec.secret_data(obj) or {}
            try:
                hosts |= set(json.loads(data.get(".dockerconfigjson", "{}")).get("auths", {}))
            except ValueError:
                continue
        return hosts

    def _pull_failed(self, pod: Pod, container: dict, err: runtime.PullError) -> None:
        if err.reason == "InvalidImageName":
            self._event(pod, "InspectFailed", err.message, kind="Warning")
            return self._waiting(pod, container, err.reason, err.message)
        pod.pull_failures += 1
        self._event(pod, "Failed", f"Failed to pull image \"{container['image']}\": {err.message}", kind="Warning")
        if pod.pull_failures == 1:
            return self._waiting(pod, container, "ErrImagePull", err.message)
        pod.next_try = time.monotonic() + BACKOFF_SECONDS
        self._waiting(pod, container, "ImagePullBackOff", f'Back-off pulling image "{container["image"]}"')

    # ---- the container ---------------------------------------------------------------------------------
    def _container_spec(self, pod: Pod, container: dict, local: str) -> dict:
        """The shim's spec: rootfs, argv, env, user, working directory, mounts, as the kubelet + runc set them."""
        ns, spec, s = pod.obj["metadata"]["namespace"], pod.obj["spec"], self.settings
        image = runtime.image_config(local)
        own = container_env(pod.obj, container, lambda n: self._config_map(ns, n), lambda n: self._secret(ns, n))
        pod_dir = self.cluster.logdir / "pods" / pod.name
        pod_dir.mkdir(parents=True, exist_ok=True)
        mounts = podspec.volume_mounts(pod.obj, container, pod_dir, lambda n: self._config_map(ns, n),
                                       lambda n: self._secret(ns, n))
        hostname = (spec.get("hostname") or pod.name)[:63]
        (pod_dir / "hosts").write_text(dns.hosts_file(pod.sandbox[1], hostname, spec.get("subdomain"), ns,
                                                      s.cluster_domain))
        (pod_dir / "resolv.conf").write_text(dns.resolv_conf(self.net.node_ip, ns, s.cluster_domain))
        mounts += [(str(pod_dir / "hosts"), "/etc/hosts", True), (str(pod_dir / "resolv.conf"), "/etc/resolv.conf", True)]
        env = {**image.env, "HOSTNAME": hostname, **own}
        if self.cluster.api_url and self._automount(pod.obj):
            sa = spec.get("serviceAccountName") or "default"
            path = pod_dir / "kubeconfig"
            path.write_text(kubeconfig(self.cluster.api_url, ns, f"system:serviceaccount:{ns}:{sa}"))
            mounts.append((str(path), "/var/run/secrets/standin/kubeconfig", True))
            env.setdefault("KUBECONFIG", "/var/run/secrets/standin/kubeconfig")  # stands in for the token
        command = [podspec.expand(a, own) for a in container.get("command") or []]
        args = [podspec.expand(a, own) for a in container.get("args") or []]
        argv = container_argv(image, command, args)
        pod.container, rootfs = self.containers.create(pod.key, local)
        uid, gid = podspec.run_as(pod.obj, container, image, rootfs)
        pod.argv, pod.env = argv, env
        read_only = bool((container.get("securityContext") or {}).get("readOnlyRootFilesystem"))
        return {"rootfs": rootfs, "argv": argv, "env": env, "uid": uid, "gid": gid, "hostname": hostname,
                "workdir": container.get("workingDir") or image.workdir, "netns": pod.sandbox[0],
                "mounts": mounts, "read_only_root": read_only}

    # ---- helpers -----------------------------------------------------------------------------------------
    def _event(self, pod: Pod, reason: str, message: str, kind: str = "Normal", source: str = "kubelet") -> None:
        """Record an Event on the pod, once per reason (a cluster aggregates repeats into a count)."""
        if reason in pod.events:
            return
        pod.events.add(reason)
        meta = pod.obj["metadata"]
        self.cluster.record_event(meta["namespace"], {
            "apiVersion": "v1", "kind": "Event", "type": kind, "reason": reason, "message": message,
            "metadata": {"name": f"{pod.name}.{len(pod.events):x}{int(time.time() * 1e6) % 16**8:08x}",
                         "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod.name, "namespace": meta["namespace"],
                               "uid": meta["uid"]},
            "source": {"component": source}, "firstTimestamp": now_iso(), "lastTimestamp": now_iso(), "count": 1})

    @staticmethod
    def _waiting(pod: Pod, container: dict, reason: str, message: str) -> None:
        waiting = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        pod.obj["status"]["containerStatuses"] = [cstatus(container, waiting)]

    def resolve(self, host: str, subdomain: str, ns: str) -> str | None:
        """Cluster DNS: the IP of the pod with that hostname behind a headless Service named `subdomain`."""
        with self.cluster.lock:
            svc = self.cluster.store.get("services", ns, subdomain)
            spec = (svc or {}).get("spec") or {}
            selector = spec.get("selector") or {}
            if not svc or spec.get("clusterIP") != "None" or not selector:
                return None
            for p in self.cluster.pods.values():
                meta, pspec = p.obj["metadata"], p.obj["spec"]
                ready = p.obj["status"].get("phase") == "Running" or spec.get("publishNotReadyAddresses")
                if (p.sandbox and ready and not p.finished() and meta["namespace"] == ns
                        and pspec.get("hostname") == host and pspec.get("subdomain") == subdomain
                        and all((meta.get("labels") or {}).get(k) == v for k, v in selector.items())):
                    return p.sandbox[1]
        return None

    def _automount(self, pod: dict) -> bool:
        spec = pod["spec"]
        if spec.get("automountServiceAccountToken") is not None:
            return spec["automountServiceAccountToken"]
        sa = self.cluster.store.get("serviceaccounts", pod["metadata"]["namespace"],
                                    spec.get("serviceAccountName") or "default")
        setting = (sa or {}).get("automountServiceAccountToken")
        return True if setting is None else setting

    def _secret(self, ns: str, name: str) -> dict | None:
        obj = self.cluster.store.get("secrets", ns, name)
        return self.cluster.secrets.get(name) if obj is None else podspec.secret_data(obj)

    def _config_map(self, ns: str, name: str) -> dict | None:
        obj = self.cluster.store.get("configmaps", ns, name)
        return None if obj is None else dict(obj.get("data") or {})


def cstatus(container: dict, state: dict) -> dict:
    return {"name": container["name"], "image": container["image"], "imageID": "", "ready": "running" in state,
            "restartCount": 0, "started": "running" in state, "state": state}


def send_signal(pod: Pod, sig: int) -> None:
    """Signal the container's shim: SIGTERM reaches the container's PID 1; SIGKILL ends the whole container."""
    if pod.proc and pod.proc.poll() is None:
        try:
            pod.proc.send_signal(sig)
        except ProcessLookupError:
            pass

