"""The stand-in's node as a cluster's node behaves between "created" and "running": image pulls that take
time or fail, private registries, GPU nodes that must first be provisioned, pods with their own network.

Each state is read through the official client, as the launcher reads it; no test asserts a duration.
"""
from __future__ import annotations

import base64
import json

import pytest
from kubernetes import client as k8s

from tests.k8s_standin import StandIn
from tests.k8s_standin.fixture import REPOSITORIES, node_settings, require_image, wait_for

pytestmark = pytest.mark.slow
NS = "node-test"


@pytest.fixture
def node(request, tmp_path):
    standin = StandIn(tmp_path / "logs", node=node_settings(**getattr(request, "param", {})))
    k8s.CoreV1Api(standin.api_client()).create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=NS)))
    yield standin
    standin.close()


def _pod_job(standin, name: str, image: str, code: str = "print('ran')", gpus: int = 0, pull_secret: str | None = None):
    container = {"name": "main", "image": image, "command": ["python", "-c", code]}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}
    spec = {"restartPolicy": "Never", "containers": [container]}
    if pull_secret:
        spec["imagePullSecrets"] = [{"name": pull_secret}]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
           "spec": {"backoffLimit": 0, "template": {"spec": spec}}}
    k8s.BatchV1Api(standin.api_client()).create_namespaced_job(NS, job)


def _pod(standin, job: str) -> k8s.V1Pod:
    pods = k8s.CoreV1Api(standin.api_client()).list_namespaced_pod(NS, label_selector=f"job-name={job}").items
    return pods[0] if pods else None


def _waiting(standin, job: str):
    pod = _pod(standin, job)
    statuses = (pod and pod.status.container_statuses) or []
    return statuses[0].state.waiting if statuses and statuses[0].state.waiting else None


def _reasons(standin, pod_name: str) -> list[str]:
    return [e["reason"] for e in standin.events(pod_name)]


def _succeeded(standin, job: str) -> bool:
    pod = _pod(standin, job)
    return bool(pod and pod.status.phase == "Succeeded")


@pytest.mark.parametrize("node", [{"pull_seconds": 4.0}], indirect=True)
def test_a_first_pull_keeps_the_pod_in_container_creating_then_the_image_is_on_the_node(node):
    _pod_job(node, "first", f"{REPOSITORIES[0]}:1")
    waiting = wait_for(lambda: _waiting(node, "first"), "the pod to wait for its image")
    pod = _pod(node, "first")
    assert waiting.reason == "ContainerCreating" and pod.status.phase == "Pending"
    assert pod.status.pod_ip and pod.status.pod_ip.startswith("10.")  # the sandbox (network) exists first
    assert _reasons(node, pod.metadata.name)[-1] == "Pulling"
    wait_for(lambda: _succeeded(node, "first"), "the pod to run once pulled", 60)
    assert "Pulled" in _reasons(node, pod.metadata.name)
    # The image is on the node now: a second pod of it starts without a pull.
    _pod_job(node, "second", f"{REPOSITORIES[0]}:1")
    wait_for(lambda: _succeeded(node, "second"), "the second pod to run", 60)
    assert "Pulling" not in _reasons(node, _pod(node, "second").metadata.name)


def test_unpullable_images_wait_with_the_kubelets_reasons(node):
    _pod_job(node, "missing", "registry.example/no-such-image:1")
    first = wait_for(lambda: _waiting(node, "missing"), "a pull failure")
    assert first.reason == "ErrImagePull" and "not found" in first.message
    backoff = wait_for(lambda: (w := _waiting(node, "missing")) and w.reason == "ImagePullBackOff" and w,
                       "the pull back-off")
    assert backoff.message == 'Back-off pulling image "registry.example/no-such-image:1"'
    # What Prefect once made of a digest reference (name:sha256:...): not a reference at all.
    _pod_job(node, "mangled", f"{REPOSITORIES[0]}:sha256:{'0' * 64}")
    invalid = wait_for(lambda: _waiting(node, "mangled"), "InvalidImageName")
    assert invalid.reason == "InvalidImageName" and "invalid reference format" in invalid.message


def test_a_digest_reference_pulls_only_the_digest_the_registry_holds(node):
    import subprocess

    digest = subprocess.run(["buildah", "images", "--digests", "--format", "{{.Digest}}", require_image()],
                            capture_output=True, text=True, check=True).stdout.split()[0]
    _pod_job(node, "pinned", f"{REPOSITORIES[1]}@{digest}")
    wait_for(lambda: _succeeded(node, "pinned"), "the pinned image to run", 60)
    _pod_job(node, "stale", f"{REPOSITORIES[1]}@sha256:{'1' * 64}")
    assert wait_for(lambda: _waiting(node, "stale"), "a pull failure").reason == "ErrImagePull"


@pytest.mark.parametrize("node", [{"private_registries": {"registry.example"}}], indirect=True)
def test_a_private_registry_needs_the_pods_pull_secret(node):
    _pod_job(node, "anonymous", f"{REPOSITORIES[0]}:1")
    denied = wait_for(lambda: _waiting(node, "anonymous"), "a pull failure")
    assert denied.reason == "ErrImagePull" and "401 Unauthorized" in denied.message
    config = json.dumps({"auths": {"registry.example": {"auth": base64.b64encode(b"u:p").decode()}}})
    k8s.CoreV1Api(node.api_client()).create_namespaced_secret(NS, k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="registry"), type="kubernetes.io/dockerconfigjson",
        string_data={".dockerconfigjson": config}))
    _pod_job(node, "authenticated", f"{REPOSITORIES[0]}:1", pull_secret="registry")
    wait_for(lambda: _succeeded(node, "authenticated"), "the pod with a pull secret to run", 60)


@pytest.mark.parametrize("node", [{"pool_gpus": 1, "provision_seconds": 3.0}], indirect=True)
def test_gpu_pods_trigger_a_scale_up_or_say_why_none_can_help(node):
    _pod_job(node, "gpu", f"{REPOSITORIES[0]}:1", gpus=1)
    wait_for(lambda: "TriggeredScaleUp" in _reasons(node, _pod(node, "gpu").metadata.name), "a scale-up")
    pod = _pod(node, "gpu")
    (scheduled,) = [c for c in pod.status.conditions if c.type == "PodScheduled"]
    assert scheduled.status == "False" and scheduled.reason == "Unschedulable"
    assert "1 Insufficient nvidia.com/gpu" in scheduled.message
    _pod_job(node, "too-big", f"{REPOSITORIES[0]}:1", gpus=8)  # no node of the pool could ever fit it
    wait_for(lambda: "NotTriggerScaleUp" in _reasons(node, _pod(node, "too-big").metadata.name), "no scale-up")
    wait_for(lambda: _succeeded(node, "gpu"), "the GPU pod to run on the new node", 60)
    assert _pod(node, "too-big").status.phase == "Pending"


def test_each_pod_has_its_own_address_and_host_loopback_is_not_the_pods(node):
    code = ("import socket, urllib.request\n"
            "print(socket.gethostbyname(socket.gethostname()))\n"
            "try:\n    urllib.request.urlopen('http://127.0.0.1:%d/', timeout=2)\n    print('reached host')\n"
            "except OSError as err:\n    print('no host loopback:', type(err).__name__)\n") % int(node.host.rsplit(":", 1)[1])
    for name in ("a", "b"):
        _pod_job(node, name, f"{REPOSITORIES[0]}:1", code=code)
    wait_for(lambda: _succeeded(node, "a") and _succeeded(node, "b"), "both pods to finish", 60)
    logs = {name: node.cluster.pods[(NS, _pod(node, name).metadata.name)].log_path.read_text().split()
            for name in ("a", "b")}
    assert logs["a"][0] != logs["b"][0] and all(log[0].startswith("10.") for log in logs.values())
    assert all("no host loopback:" in " ".join(log) for log in logs.values())
