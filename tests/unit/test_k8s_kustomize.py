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

from pipeline.launch.k8s_manifests import K8S_SCHEMA_VERSION, render_job, render_service

from pipeline.launch.k8s_settings import KubernetesLaunchConfig
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


def _rules(role: dict) -> dict:
    return {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}


def test_worker_and_flow_runs_have_separate_least_privilege_roles():
    docs = _by_key(build("gpu"))
    # The worker: flow-run Jobs (create; delete on cancel), and its observer's watches, logs and Events.
    assert _rules(docs[("Role", "prefect-worker")]) == {
        ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
        ("", "pods"): {"get", "list", "watch"}, ("", "pods/log"): {"get"}, ("", "events"): {"create"}}
    # Flow-run pods: exactly the launcher's calls (create/get/list/delete Jobs, list pods, logs, Services, and
    # the Events that tell a pull or a scale-up in progress from a pod that can never start).
    assert _rules(docs[("Role", "pipeline-flow-run")]) == {
        ("batch", "jobs"): {"create", "get", "list", "delete"}, ("", "pods"): {"list"},
        ("", "pods/log"): {"get"}, ("", "services"): {"create", "delete"}, ("", "events"): {"list"}}
    for role in ("prefect-worker", "pipeline-flow-run"):
        assert not {r for _, r in _rules(docs[("Role", role)])} & {"secrets", "configmaps", "pods/exec"}, role
        binding = docs[("RoleBinding", role)]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": role, "namespace": "ml-pipeline"}]
        assert ("ServiceAccount", role) in docs
    assert not any(d["kind"].startswith("Cluster") for d in build("gpu"))
    worker = docs[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]
    assert worker["serviceAccountName"] == "prefect-worker"
    env = {e["name"]: e for e in worker["containers"][0]["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]["valueFrom"]["fieldRef"]["fieldPath"] \
        == "metadata.namespace"


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


def _flow_run_job(template: dict, values: dict | None = None) -> dict:
    """The Job the real Prefect Kubernetes worker would submit for a flow run (its own code)."""
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    config = run_coro_as_sync(KubernetesWorkerJobConfiguration.from_template_and_values(template, values or {}))
    config.prepare_for_flow_run(FlowRun(id=uuid4(), name="calm-otter", flow_id=uuid4()))
    return config.job_manifest


def test_base_job_template_is_accepted_and_rendered_by_prefect_kubernetes():
    docs = _by_key(build("gpu"))
    template = json.loads(docs[("ConfigMap", "prefect-base-job-template")]["data"]["base-job-template.json"])
    job = _flow_run_job(template)
    # prefect-kubernetes insists on parallelism/completions inside the *pod* spec, which PodSpec lacks:
    # the API server (default fieldValidation=Warn) drops exactly these with a warning. Nothing else
    # may be unknown, so the rest is checked strictly.
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    kubernetes_validate.validate(job, K8S_SCHEMA_VERSION, strict=True)
    container = pod["containers"][0]
    assert pod["imagePullSecrets"] == []  # no pull Secret unless the pool or deployment names one
    assert "command" not in container and container["args"] == ["prefect", "flow-run", "execute"]
    assert pod["serviceAccountName"] == "pipeline-flow-run" and ("ServiceAccount", "pipeline-flow-run") in docs
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials", "optional": True}}]
    env = {e["name"]: e for e in container["env"]}
    assert {"PIPELINE_K8S_CONFIG", "PIPELINE_K8S_OVERRIDES", "PREFECT__FLOW_RUN_ID"} <= set(env)
    # The flow-run pod learns its own Job (the stage Jobs' owner) from labels the Job controller sets.
    assert env["PIPELINE_OWNER_JOB_UID"]["valueFrom"]["fieldRef"]["fieldPath"] \
        == "metadata.labels['batch.kubernetes.io/controller-uid']"


def test_work_pool_variables_reach_the_flow_run_job():
    template = json.loads((K8S / "base" / "base-job-template.json").read_text())
    image = "registry.example/pipeline:0.1.0@sha256:" + "a" * 64
    job = _flow_run_job(template, {"image": image, "env_from": [], "image_pull_secrets": [{"name": "registry"}],
                                   "service_account_name": "irsa-flow-run", "namespace": "team-a"})
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == image and pod["containers"][0]["envFrom"] == []
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["serviceAccountName"] == "irsa-flow-run" and job["metadata"]["namespace"] == "team-a"
    pod.pop("parallelism"), pod.pop("completions")
    kubernetes_validate.validate(job, K8S_SCHEMA_VERSION, strict=True)


def _with_worker_pull_secret(tmp_path: Path, overlay: str) -> Path:
    """A copy of k8s/ whose overlay has its commented-out worker pull-Secret patch uncommented, as
    the kustomization's comment and docs/kubernetes.md tell an admin to do."""
    shutil.copytree(K8S, tmp_path / "k8s")
    kz = tmp_path / "k8s" / "overlays" / overlay / "kustomization.yaml"
    head, marker, block = kz.read_text().partition("\n# patches:\n")
    assert marker and block, f"{kz}: no commented-out `patches:` block"
    kz.write_text(head + "\npatches:\n" + "".join(line.removeprefix("# ") + "\n" for line in block.splitlines()))
    return tmp_path / "k8s" / "overlays" / overlay


@pytest.mark.skipif(not KUBECTL, reason="needs kubectl (kustomize patches)")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_pull_secret_patch_as_documented(tmp_path, overlay):
    default = _by_key(build(overlay))
    assert "imagePullSecrets" not in default[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]
    out = subprocess.run([KUBECTL, "kustomize", str(_with_worker_pull_secret(tmp_path, overlay))],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    patched = _by_key(d for d in yaml.safe_load_all(out) if d)
    for doc in patched.values():
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
    worker = patched.pop(("Deployment", "prefect-worker"))
    assert worker["spec"]["template"]["spec"].pop("imagePullSecrets") == [{"name": "registry-credentials"}]
    # The patch adds exactly that: everything else is the default build.
    assert worker == default.pop(("Deployment", "prefect-worker")) and patched == default


def test_deploy_check_rejects_what_the_worker_or_launcher_would(tmp_path, capsys):
    from flows.deploy import main

    bad = json.loads((K8S / "base" / "base-job-template.json").read_text())
    del bad["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["completions"]
    (tmp_path / "template.json").write_text(json.dumps(bad))
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "launch.json").write_text(json.dumps({"gpus_per_node": "eight", "nodez": 2}))
    code = main(["--check", "--image", "registry.example/pipeline:latest", "--storage", "s3://bucket/p",
                 "--overlay", str(tmp_path / "overlay"), "--base-job-template", str(tmp_path / "template.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert "template.json" in err and "/spec/template/spec/completions" in err
    assert "launch.json: gpus_per_node" in err and "launch.json: nodez: unknown key" in err
    assert "--image" in err and "pinned" in err
    ok = main(["--check", "--image", "registry.example/pipeline:0.1.0", "--storage", "s3://bucket/p",
               "--overlay", str(K8S / "overlays" / "gpu")])
    assert ok == 0


def test_secret_template_carries_no_values_and_is_not_applied():
    secret = yaml.safe_load((K8S / "base" / "s3-credentials.secret.example.yaml").read_text())
    assert all(v == "" for v in secret["stringData"].values())
    assert all(d["kind"] != "Secret" for overlay in OVERLAYS for d in build(overlay))
