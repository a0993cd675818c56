"""`k8s_standin` pytest fixture: a running stand-in API server plus fault-injection handles.

Use it from a conftest.py or test module with `from tests.k8s_standin import k8s_standin`.
Pods run in the image `make image` built (IMAGE, default localhost/pipeline:dev), which the
stand-in's registry serves as `registry.example/pipeline` and `ghcr.io/example/pipeline` (any tag,
or the image's own digest), each pod in its own network namespace. Launcher tests run FAKE in
FAKE_IMAGE instead: the same image plus tests/k8s_standin/fake_stage.py (Containerfile.fakes).
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s

from tests.k8s_standin.cluster import Cluster
from tests.k8s_standin.kubelet import NodeSettings
from tests.k8s_standin.podspec import kubeconfig
from tests.k8s_standin.server import StandInServer

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("IMAGE", "localhost/pipeline:dev")
REPOSITORIES = ("registry.example/pipeline", "ghcr.io/example/pipeline")
FAKE_IMAGE = "registry.example/pipeline-fakes:test"
FAKE = ["python", "/opt/fakes/fake_stage.py"]
_fakes: dict[str, str] = {}


def require_image(image: str = IMAGE) -> str:
    """The built image's name; a clear failure when `make image` has not run."""
    done = subprocess.run(["buildah", "inspect", "--type", "image", image], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"the stand-in's pods run the image {image}, which is not built here: run `make image` "
                    f"(or IMAGE=... for another one); buildah said: {done.stderr.strip()[:200]}", pytrace=False)
    return image


def fakes_image() -> str:
    """IMAGE + the fake stage, built once per session (cached layers: a second build takes a second)."""
    if not _fakes:
        base, name = require_image(), "localhost/pipeline-fakes:dev"
        here = Path(__file__).parent
        # pytest-xdist workers build it too: one build at a time moves the tag (a second finds every layer cached).
        with open(Path(tempfile.gettempdir()) / "pipeline-fakes-image.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = subprocess.run(["buildah", "bud", "--isolation", "chroot", "--layers", "--quiet", "-f",
                                   str(here / "Containerfile.fakes"), "--build-arg", f"BASE={base}", "-t", name,
                                   str(here)], capture_output=True, text=True)
        if done.returncode:
            pytest.fail(f"building {name}: {done.stderr.strip()[-500:]}", pytrace=False)
        _fakes["image"] = name
    return _fakes["image"]


def node_settings(**overrides) -> NodeSettings:
    """The default node: the built image under the test repositories, and the fakes image."""
    image = require_image()
    images = {**{repo: image for repo in REPOSITORIES}, FAKE_IMAGE.split(":")[0]: fakes_image()}
    return NodeSettings(**{"images": images, **overrides})


class StandIn:
    def __init__(self, logdir: Path, secrets: dict | None = None, node: NodeSettings | None = None, **cluster_options):
        self.cluster = Cluster(logdir, secrets, node or node_settings(), **cluster_options)
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

    def running(self, job: str | None = None, exclude: str | None = None, label: str = "job-name") -> list[dict]:
        """Pods in phase Running and not being deleted; of Job `job` (and not of `exclude`) by `label`."""
        return [p for p in self.pods() if p["status"]["phase"] == "Running"
                and not p["metadata"].get("deletionTimestamp")
                and (job is None or p["metadata"]["labels"].get(label) == job)
                and (exclude is None or p["metadata"]["labels"].get(label) != exclude)]

    def jobs(self) -> list[dict]:
        with self.cluster.lock:
            return [s.obj for s in self.cluster.jobs.values()]

    def events(self, pod_name: str | None = None) -> list[dict]:
        return [e for e in self.objects("events") if pod_name in (None, e["involvedObject"]["name"])]

    def node_url(self, port: int) -> str:
        """A host service on 127.0.0.1:port as pods reach it (the node address): `http://10.x.y.1:port`."""
        return f"http://{self.cluster.net.expose(port)}"

    def lend_s3(self, endpoint: str) -> dict[str, str]:
        """The tests' S3 at `endpoint` (http://127.0.0.1:PORT, moto) as pods reach it: seeds the
        `s3-credentials` Secret (every namespace) and returns the same variables for a StageCommand's env."""
        from tests.s3_fixtures import AWS_ENV

        port = int(endpoint.rsplit(":", 1)[1])
        env = {**AWS_ENV, "AWS_ENDPOINT_URL": self.node_url(port)}
        self.cluster.secrets["s3-credentials"] = env
        return env

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


def wait_for(predicate, what: str, timeout: float = 90.0, poll: float = 0.05):
    """The predicate's first truthy value, polled; AssertionError naming `what` after `timeout` s. A wait, not a
    timing check: generous, because two pytest-xdist workers on two cores can delay a pod's start by tens of s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture
def k8s_standin(tmp_path):
    standin = StandIn(tmp_path / "standin-pod-logs", secrets={"s3-credentials": {}})
    try:
        yield standin
    finally:
        standin.close()
