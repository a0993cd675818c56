"""Pure rendering of a stage's Kubernetes objects: an indexed Job plus a headless Service.

No API calls here, so tests validate the exact dicts the launcher sends against the
official schemas offline (kubernetes-validate, strict). One pod per node; each pod runs
`python -m pipeline <stage> ...` and Lightning spawns `gpus_per_node` processes inside it.

Rendezvous: an indexed Job names pod i's hostname `<job>-<i>`; with `subdomain` set to a
headless Service of the same name, pod 0 resolves as `<job>-0.<job>.<ns>.svc.cluster.local`.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The oldest API version whose schemas the manifests must satisfy: podFailurePolicy is GA
# since 1.31 and the managed clusters we target run 1.32+.
K8S_SCHEMA_VERSION = "1.32.0"
CONTAINER_NAME = "trainer"
LABEL_PREFIX = "pipeline.example"
RUN_LABEL = f"{LABEL_PREFIX}/flow-run-id"
STAGE_LABEL = f"{LABEL_PREFIX}/stage"
JOB_LABEL = f"{LABEL_PREFIX}/job"
MANAGED_BY = {"app.kubernetes.io/managed-by": "pipeline-launcher"}
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# JSON of KubernetesLaunchConfig fields: base values, then the overlay's (k8s/ ConfigMap training-launch).
CONFIG_ENVS = ("PIPELINE_K8S_CONFIG", "PIPELINE_K8S_OVERRIDES")


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = "NoSchedule"


class KubernetesLaunchConfig(BaseModel):
    """Where and how a stage runs on Kubernetes. Loaded from params, flow parameters or the
    `PIPELINE_K8S_CONFIG` env var that the k8s/ overlays set on flow-run pods."""

    model_config = ConfigDict(extra="forbid")

    namespace: str = "ml-pipeline"
    """Namespace of the training Jobs; the worker's Role grants rights only there."""
    image: str = "ghcr.io/example/pipeline:0.1.0"
    """The one image of every stage (see Dockerfile). Pin a tag or digest, never `latest`."""
    image_pull_policy: str = "IfNotPresent"
    nodes: int = Field(1, ge=1)
    """Pods (= Lightning num_nodes). One pod per node."""
    gpus_per_node: int = Field(0, ge=0)
    """nvidia.com/gpu per pod (= Lightning devices). 0 runs one CPU process per pod."""
    node_selector: dict[str, str] = {}
    """E.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"} to pick the GPU type."""
    tolerations: list[Toleration] = []
    cpu_request: str = "1"
    cpu_limit: str = "2"
    memory_request: str = "2Gi"
    memory_limit: str = "4Gi"
    shm_size: str = "1Gi"
    """/dev/shm size: DataLoader workers share batches through it; Docker's 64Mi default stalls them."""
    active_deadline_seconds: int = Field(6 * 3600, ge=1)
    ttl_seconds_after_finished: int = Field(3600, ge=0)
    backoff_limit: int = Field(2, ge=0)
    """Retries of infra failures (not exit 2, not preemptions: those are handled by podFailurePolicy)."""
    termination_grace_seconds: int = Field(60, ge=0)
    """Time between SIGTERM and SIGKILL: long enough for the stage to write its checkpoint."""
    master_port: int = Field(29500, ge=1, le=65535)
    service_account: str | None = None
    """Training pods need no API access; set only if IRSA/workload identity needs an SA."""
    env_from_secret: str | None = "s3-credentials"
    """Secret whose keys become env vars (AWS_ACCESS_KEY_ID...). None when using IRSA."""
    read_only_root_filesystem: bool = False
    """Off by default: stages write DVC-relative outputs under the workdir. Turn on when every
    output path is a storage URI (s3://); /tmp stays writable either way."""
    command: list[str] = ["python", "-m", "pipeline"]
    """The stage entry point; tests swap in a tiny script."""
    log_dir: str = "logs/k8s"
    """Local folder where each pod's log is kept as <job>/rank-N.log after the pods are gone."""
    poll_seconds: float = Field(2.0, gt=0)
    """Job/pod status poll period (polling keeps RBAC to get/list, no watch needed)."""
    api_attempts: int = Field(6, ge=1)
    """Tries per API request on 429, 5xx and dropped connections (exponential backoff, ~30 s in all)."""

    @field_validator("image")
    @classmethod
    def _pinned(cls, image: str) -> str:
        if image.endswith(":latest") or (":" not in image.rsplit("/", 1)[-1] and "@" not in image):
            raise ValueError(f"image {image!r} must be pinned by tag or digest")
        return image

    @classmethod
    def from_env(cls, **overrides: Any) -> "KubernetesLaunchConfig":
        """$PIPELINE_K8S_CONFIG, then $PIPELINE_K8S_OVERRIDES (the overlay), then explicit overrides."""
        merged: dict[str, Any] = {}
        for name in CONFIG_ENVS:
            merged.update(json.loads(os.environ.get(name) or "{}"))
        return cls(**{**merged, **overrides})


def _dns_label(text: str, limit: int) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:limit].rstrip("-") or "x"


def label_value(text: str) -> str:
    """Label values: <=63 chars of [A-Za-z0-9._-], alphanumeric at both ends."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63].strip("-._") or "none"


def new_job_name(stage: str, run_id: str) -> str:
    # <=52 chars so the pod hostname `<job>-<index>` and generated pod names stay <=63.
    return f"{_dns_label(stage, 12)}-{_dns_label(run_id, 24)}-{secrets.token_hex(3)}"


def master_addr(job_name: str, namespace: str) -> str:
    return f"{job_name}-0.{job_name}.{namespace}.svc.cluster.local"


def trainer_args(cfg: KubernetesLaunchConfig) -> list[str]:
    """Lightning settings that make world size = nodes x devices on every rank."""
    devices = max(cfg.gpus_per_node, 1)
    args = {"trainer.num_nodes": cfg.nodes, "trainer.devices": devices,
            "trainer.accelerator": "gpu" if cfg.gpus_per_node else "cpu"}
    if cfg.nodes * devices > 1:
        args["trainer.strategy"] = "ddp"
    return [part for key, value in args.items() for part in ("--set", f"{key}={value}")]


def _labels(cfg_stage: str, run_id: str, job_name: str) -> dict[str, str]:
    return {**MANAGED_BY, RUN_LABEL: label_value(run_id), STAGE_LABEL: label_value(cfg_stage),
            JOB_LABEL: job_name}


def _env(cfg: KubernetesLaunchConfig, job_name: str, run_id: str, extra: dict[str, str]) -> list[dict]:
    env = [{"name": k, "value": v} for k, v in sorted(extra.items())]
    env += [
        {"name": "MASTER_ADDR", "value": master_addr(job_name, cfg.namespace)},
        {"name": "MASTER_PORT", "value": str(cfg.master_port)},
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
        {"name": "PIPELINE_FLOW_RUN_ID", "value": run_id},
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # lines reach the log stream as printed
        {"name": "HOME", "value": "/tmp"},  # libraries write caches under $HOME
    ]
    # WORLD_SIZE and RANK are left unset on purpose: with them plus KUBERNETES_PORT present,
    # Lightning would pick its Kubeflow environment and skip spawning per-GPU processes.
    return env


def _resources(cfg: KubernetesLaunchConfig) -> dict:
    requests = {"cpu": cfg.cpu_request, "memory": cfg.memory_request}
    limits = {"cpu": cfg.cpu_limit, "memory": cfg.memory_limit}
    if cfg.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(cfg.gpus_per_node)
    return {"requests": requests, "limits": limits}


def _pod_spec(cfg: KubernetesLaunchConfig, job_name: str, stage: str, args: list[str],
              run_id: str, env: dict[str, str]) -> dict:
    container = {
        "name": CONTAINER_NAME,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": list(cfg.command),
        "args": [stage, *args, *trainer_args(cfg)],
        "env": _env(cfg, job_name, run_id, env),
        "ports": [{"name": "rendezvous", "containerPort": cfg.master_port}],
        "resources": _resources(cfg),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": cfg.read_only_root_filesystem,
            "runAsNonRoot": True,
        },
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    if cfg.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": cfg.env_from_secret}}]
    spec: dict[str, Any] = {
        "subdomain": job_name,
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # keeps other Services' env vars out of the trainer
        "terminationGracePeriodSeconds": cfg.termination_grace_seconds,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                            "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}},
                    {"name": "tmp", "emptyDir": {}}],
    }
    if cfg.service_account:
        spec["serviceAccountName"] = cfg.service_account
    if cfg.node_selector:
        spec["nodeSelector"] = dict(cfg.node_selector)
    if cfg.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in cfg.tolerations]
    return spec


def owner_reference(kind: str, name: str, uid: str, api_version: str = "batch/v1") -> dict:
    """Makes the garbage collector delete the dependent with its owner. No blockOwnerDeletion:
    that would need `update` on the owner's finalizers, a right the flow-run pod does not have."""
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid}


def render_job(cfg: KubernetesLaunchConfig, job_name: str, stage: str, args: list[str],
               run_id: str, env: dict[str, str] | None = None, owner: dict | None = None) -> dict:
    labels = _labels(stage, run_id, job_name)
    metadata: dict[str, Any] = {"name": job_name, "namespace": cfg.namespace, "labels": labels}
    if owner:
        # The flow-run Job owns its stage Jobs: if the flow-run pod is lost and its Job deleted (TTL,
        # kubectl, Prefect cancel), no GPU Job outlives it.
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completionMode": "Indexed",
            "completions": cfg.nodes,
            "parallelism": cfg.nodes,
            "backoffLimit": cfg.backoff_limit,
            "activeDeadlineSeconds": cfg.active_deadline_seconds,
            "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
            "podFailurePolicy": {"rules": [
                # Preemption/eviction: the replacement resumes from the checkpoint; not a failure.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # Exit 2 = bad config or data: retrying burns GPU-hours for the same error.
                {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER_NAME,
                                                      "operator": "In", "values": [2]}},
            ]},
            "template": {
                "metadata": {"labels": labels},
                "spec": _pod_spec(cfg, job_name, stage, args, run_id, env or {}),
            },
        },
    }


def render_service(cfg: KubernetesLaunchConfig, job_name: str, stage: str, run_id: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": job_name, "namespace": cfg.namespace,
                     "labels": _labels(stage, run_id, job_name)},
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve pod 0 while it is still starting, before any readiness.
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: job_name},
            "ports": [{"name": "rendezvous", "port": cfg.master_port, "targetPort": cfg.master_port}],
        },
    }
