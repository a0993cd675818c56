"""The launcher's Job and Service: strict schema validity and the fields the issue requires."""
from __future__ import annotations

import kubernetes_validate
import pytest

from pipeline.params import load_config

from pipeline.launch.k8s_manifests import (
    COMPLETION_INDEX_ANNOTATION, K8S_SCHEMA_VERSION, master_addr, new_job_name, render_job, render_service,
)
from pipeline.launch.k8s_settings import KubernetesLaunchConfig

GPU = KubernetesLaunchConfig(
    namespace="train", image="registry.example/pipeline:1.2.3", nodes=2, gpus_per_node=8,
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=[{"key": "nvidia.com/gpu"}], service_account="trainer")
CPU = KubernetesLaunchConfig(image="registry.example/pipeline:1.2.3", nodes=2, env_from_secret=None)


def _render(cfg):
    name = new_job_name("pretrain", "0b7c2d6e-1f7a-4c47-9a55-4a8e2b1c9d00")
    job = render_job(cfg, name, "pretrain", ["--set", "pretrain.max_steps=8"], "0b7c2d6e-1f7a-4c47-9a55-4a8e2b1c9d00",
                     {"EXTRA": "1"})
    return name, job, render_service(cfg, name, "pretrain", "0b7c2d6e-1f7a-4c47-9a55-4a8e2b1c9d00")


@pytest.mark.parametrize("cfg", [GPU, CPU], ids=["gpu", "cpu"])
@pytest.mark.parametrize("version", [K8S_SCHEMA_VERSION, "1.37.0"])
def test_job_and_service_validate_strictly(cfg, version):
    _, job, svc = _render(cfg)
    kubernetes_validate.validate(job, version, strict=True)
    kubernetes_validate.validate(svc, version, strict=True)


def test_gpu_job_sets_rendezvous_ranks_and_world_size():
    name, job, svc = _render(GPU)
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert pod["subdomain"] == svc["metadata"]["name"] == name
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{name}.train.svc.cluster.local" == master_addr(name, "train")
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
    assert env["PIPELINE_DDP_TIMEOUT_S"]["value"] == "300"  # the collective (and rendezvous) wait is bounded
    args = container["args"]
    assert args[:3] == ["pretrain", "--set", "pretrain.max_steps=8"]
    assert {"trainer.num_nodes=2", "trainer.devices=8", "trainer.accelerator=gpu"} <= set(args)
    sets = [value for flag, value in zip(args, args[1:]) if flag == "--set" and value.startswith("trainer.")]
    assert load_config(None, sets).trainer.strategy == "ddp"  # the config's own rule
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"pipeline.example/job": name}
    assert len(f"{name}-1") <= 63  # pod hostname is a DNS label


def test_job_failure_policy_lifetime_and_security():
    _, job, _ = _render(GPU)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    # Any lost pod ends the attempt at once (the launcher restarts the whole group); exit 2 never restarts.
    assert spec["backoffLimit"] == 0
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2]
    assert rules[1] == {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert pod["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] > 0
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert job["metadata"]["labels"]["pipeline.example/flow-run-id"] == "0b7c2d6e-1f7a-4c47-9a55-4a8e2b1c9d00"


def test_cpu_job_asks_for_no_gpu_and_one_device_per_node():
    _, job, _ = _render(CPU)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert {"trainer.devices=1", "trainer.accelerator=cpu"} <= set(container["args"])
    assert "envFrom" not in container


def test_config_rejects_unpinned_images_and_reads_overlay_env(monkeypatch):
    with pytest.raises(ValueError, match="pinned"):
        KubernetesLaunchConfig(image="registry.example/pipeline:latest")
    with pytest.raises(ValueError, match="pinned"):
        KubernetesLaunchConfig(image="registry.example/pipeline")
    monkeypatch.setenv("PIPELINE_K8S_CONFIG", '{"nodes": 4, "gpus_per_node": 8}')
    cfg = KubernetesLaunchConfig.from_env(nodes=2)
    assert (cfg.nodes, cfg.gpus_per_node) == (2, 8)


CONVENTIONS = GPU.model_copy(update={
    "queue_name": "gpu-h100", "priority_class_name": "training-high", "image_pull_secrets": ["registry", "mirror"],
    "extra_labels": {"team": "vision", "example.com/cost-center": "ml-42"},
    "extra_annotations": {"example.com/owner": "Vision team <vision@example.com>"}, "guaranteed_qos": True})


@pytest.mark.parametrize("version", [K8S_SCHEMA_VERSION, "1.37.0"])
def test_cluster_conventions_validate_strictly(version):
    _, job, svc = _render(CONVENTIONS)
    kubernetes_validate.validate(job, version, strict=True)
    kubernetes_validate.validate(svc, version, strict=True)


def test_cluster_conventions_are_rendered():
    name, job, svc = _render(CONVENTIONS)
    meta, pod = job["metadata"], job["spec"]["template"]
    # Kueue: the queue label on the Job, created suspended so Kueue admits every pod at once.
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-h100" and job["spec"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in pod["metadata"]["labels"]
    assert pod["spec"]["priorityClassName"] == "training-high"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}, {"name": "mirror"}]
    for labels in (meta["labels"], pod["metadata"]["labels"], svc["metadata"]["labels"]):
        assert labels["team"] == "vision" and labels["pipeline.example/job"] == name
    assert meta["annotations"] == pod["metadata"]["annotations"] == CONVENTIONS.extra_annotations
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "8"}
    _, plain, _ = _render(GPU)
    assert "suspend" not in plain["spec"] and "annotations" not in plain["metadata"]
    assert not {"priorityClassName", "imagePullSecrets"} & set(plain["spec"]["template"]["spec"])


@pytest.mark.parametrize("settings, message", [
    ({"queue_name": "gpu queue"}, "not a valid label value"),
    ({"queue_name": ""}, "must not be empty"),
    ({"priority_class_name": "High_Priority"}, "not a valid object name"),
    ({"image_pull_secrets": ["Registry"]}, "not a valid object name"),
    ({"extra_labels": {"pipeline.example/stage": "x"}}, "reserved"),
    ({"extra_labels": {"app.kubernetes.io/managed-by": "me"}}, "reserved"),
    ({"extra_labels": {"kueue.x-k8s.io/queue-name": "q"}}, "use queue_name"),
    ({"extra_labels": {"team": "a b"}}, "not a valid label value"),
    ({"extra_labels": {"-team": "a"}}, "not a valid key"),
    ({"extra_annotations": {"batch.kubernetes.io/job-completion-index": "0"}}, "reserved"),
    ({"guaranteed_qos": True, "memory_request": "1Gi", "memory_limit": "2Gi"}, "memory_request '1Gi' differs"),
    ({"light": {"cpu": "1"}}, "Extra inputs"),
    ({"kueue": True}, "Extra inputs"),
])
def test_cluster_convention_fields_are_validated(settings, message):
    with pytest.raises(ValueError, match=message):
        KubernetesLaunchConfig(**settings)


def test_guaranteed_qos_accepts_equal_or_omitted_requests():
    cfg = KubernetesLaunchConfig(guaranteed_qos=True, cpu_request="4", cpu_limit="4", memory_limit="8Gi")
    _, job, _ = _render(cfg)
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "4", "memory": "8Gi"}
