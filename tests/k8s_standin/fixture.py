"""`k8s_standin` pytest fixture: a running stand-in API server plus fault-injection handles.

Use it from a conftest.py or test module with `from tests.k8s_standin import k8s_standin`.
Pods run the image described by the repository's Dockerfile, with the repository root as
its WORKDIR and this interpreter's venv as the image's, so `python -m pipeline ...` runs
this checkout's code.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s

from tests.k8s_standin.cluster import Cluster
from tests.k8s_standin.kubelet import kubeconfig
from tests.k8s_standin.server import StandInServer

REPO_ROOT = Path(__file__).resolve().parents[2]


class StandIn:
    def __init__(self, workdir: Path, logdir: Path, **cluster_options):
        self.cluster = Cluster(workdir, logdir, **cluster_options)
        self.server = StandInServer(self.cluster)
        self.host = f"http://{self.server.host}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="standin-http")
        self._thread.start()

    def api_client(self) -> k8s.ApiClient:
        """An official-client ApiClient aimed at the stand-in (no auth, plain HTTP)."""
        conf = k8s.Configuration(host=self.host)
        conf.retries = False  # a retry would hide the 'exactly one request' behaviour under test
        return k8s.ApiClient(conf)

    def write_kubeconfig(self, path: Path, namespace: str | None = None, user: str | None = None) -> Path:
        """A kubeconfig for kubectl or `kubernetes.config.load_kube_config` (plain HTTP, no credentials;
        `user` only names the caller in `requests()`)."""
        path = Path(path)
        path.write_text(kubeconfig(self.host, namespace, user))
        return path

    def evict(self, pod_name: str) -> None:
        self.cluster.evict(pod_name)

    def kill(self, pod_name: str) -> None:
        self.cluster.kill(pod_name)

    def fail_next(self, verb: str, resource: str, status: int) -> None:
        """The next `verb` on `resource` (e.g. "create", "jobs"; "get", "pods/log") answers `status`."""
        with self.server.lock:
            self.server.faults.append((verb, resource, status))

    def requests(self, verb: str | None = None, resource: str | None = None) -> list[tuple]:
        with self.server.lock:
            return [r for r in self.server.requests if verb in (None, r[0]) and resource in (None, r[1])]

    def objects(self, resource: str, namespace: str | None = None) -> list[dict]:
        """Stored objects of one resource (plural: "services", "configmaps"...), as the API would list them."""
        with self.cluster.lock:
            return self.cluster.store.items(resource, namespace)

    def pods(self) -> list[dict]:
        with self.cluster.lock:
            return [p.obj for p in self.cluster.pods.values()]

    def jobs(self) -> list[dict]:
        with self.cluster.lock:
            return [s.obj for s in self.cluster.jobs.values()]

    def services(self) -> list[dict]:
        return self.objects("services")

    def processes(self) -> list:
        """Every process the stand-in ever started (dead ones too), to prove none survive."""
        with self.cluster.lock:
            return list(self.cluster.processes)

    def close(self) -> None:
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.cluster.shutdown()


def wait_for(predicate, what: str, timeout: float = 30.0, poll: float = 0.05):
    """The predicate's first truthy value, polled; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture
def k8s_standin(tmp_path):
    standin = StandIn(REPO_ROOT, tmp_path / "standin-pod-logs", secrets={"s3-credentials": {}})
    try:
        yield standin
    finally:
        standin.close()
