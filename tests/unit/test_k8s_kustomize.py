"""k8s/ overlays: they build, validate strictly, keep pods restricted, and feed the launcher."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline.launch.k8s_manifests import K8S_SCHEMA_VERSION, KubernetesLaunchConfig, render_job, render_service
from tests.k8s_standin import kustomize_lite

K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = ["dev", "gpu"]
KUBECTL = shutil.which("kubectl")


def build(overlay: str) -> list[dict]:
    """The real kustomize (kubectl's) when present, else the minimal reader; both must agree."""
    if KUBECTL:
        out = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
                             capture_output=True, text=True, check=True, timeout=120).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    return kustomize_lite.build(K8S / "overlays" / overlay)


def _by_key(docs):
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _pod_specs(docs):
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def _launch_config(docs) -> KubernetesLaunchConfig:
    data = _by_key(docs)[("ConfigMap", "training-launch")]["data"]
    return KubernetesLaunchConfig(**{**json.loads(data["base.json"]), **json.loads(data["overlay.json"])})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay):
    docs = build(overlay)
    assert {d["kind"] for d in docs} >= {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment", "ConfigMap"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "ml-pipeline"


@pytest.mark.skipif(not KUBECTL, reason="needs kubectl to compare against the real kustomize")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_minimal_reader_matches_real_kustomize(overlay):
    assert _by_key(kustomize_lite.build(K8S / "overlays" / overlay)) == _by_key(build(overlay))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_restricted_limited_and_pinned(overlay):
    specs = dict(_pod_specs(build(overlay)))
    assert specs, "no pod templates found"
    for name, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), name
            assert re.search(r":[0-9][\w.-]*$|@sha256:", c["image"]) and not c["image"].endswith(":latest"), name


def test_worker_role_is_least_privilege():
    docs = _by_key(build("gpu"))
    rules = {(g, r): set(rule["verbs"]) for rule in docs[("Role", "prefect-worker")]["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules == {("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
                     ("", "pods"): {"get", "list", "watch"}, ("", "pods/log"): {"get"},
                     ("", "services"): {"create", "get", "list", "delete"}}
    assert not any(d["kind"].startswith("Cluster") for d in build("gpu"))
    binding = docs[("RoleBinding", "prefect-worker")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "prefect-worker", "namespace": "ml-pipeline"}]


@pytest.mark.parametrize("overlay, gpus", [("dev", 0), ("gpu", 8)])
def test_overlay_launch_settings_render_valid_training_jobs(overlay, gpus):
    cfg = _launch_config(build(overlay))
    job = render_job(cfg, "pretrain-abc-123456", "pretrain", [], "abc")
    kubernetes_validate.validate(job, K8S_SCHEMA_VERSION, strict=True)
    kubernetes_validate.validate(render_service(cfg, "pretrain-abc-123456", "pretrain", "abc"), K8S_SCHEMA_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    assert ("nvidia.com/gpu.product" in pod.get("nodeSelector", {})) == bool(gpus)
    assert bool(pod.get("tolerations")) == bool(gpus)


def test_base_job_template_renders_a_valid_flow_run_job():
    """Fill the Prefect template's placeholders with its defaults, as the worker does."""
    template = json.loads(_by_key(build("gpu"))[("ConfigMap", "prefect-base-job-template")]
                          ["data"]["base-job-template.json"])
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    values = {**defaults, "command": ["prefect", "flow-run", "execute"], "labels": {"app": "flow"},
              "name": "pipeline-flow"}

    def fill(node):
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        match = re.fullmatch(r"\{\{ (\w+) \}\}", node) if isinstance(node, str) else None
        return values[match[1]] if match else (node.replace("{{ name }}", values["name"]) if isinstance(node, str) else node)

    job = fill(template["job_configuration"]["job_manifest"])
    kubernetes_validate.validate(job, K8S_SCHEMA_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "prefect-worker"
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert {"PIPELINE_K8S_CONFIG", "PIPELINE_K8S_OVERRIDES"} <= env


def test_secret_template_carries_no_values_and_is_not_applied():
    secret = yaml.safe_load((K8S / "base" / "s3-credentials.secret.example.yaml").read_text())
    assert all(v == "" for v in secret["stringData"].values())
    assert all(d["kind"] != "Secret" for overlay in OVERLAYS for d in build(overlay))
