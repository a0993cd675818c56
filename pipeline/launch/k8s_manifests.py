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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

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
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Keys extra_labels/extra_annotations may not set: the pipeline's own, the Job controller's, and Kueue's
# queue label (set it with queue_name, which also creates the Job suspended).
RESERVED_PREFIXES = (f"{LABEL_PREFIX}/", "batch.kubernetes.io/")
RESERVED_KEYS = (*MANAGED_BY, QUEUE_LABEL, "controller-uid", "job-name")
_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"


def _check_label_value(value: str, what: str) -> str:
    if len(value) > 63 or (value and not re.fullmatch(_NAME, value)):
        raise ValueError(f"{what} {value!r} is not a valid label value (<= 63 characters of [A-Za-z0-9._-], "
                         "alphanumeric at both ends)")
    return value


def _check_dns_subdomain(name: str, what: str) -> str:
    if len(name) > 253 or not re.fullmatch(_DNS_SUBDOMAIN, name):
        raise ValueError(f"{what} {name!r} is not a valid object name (lowercase DNS subdomain, <= 253 characters)")
    return name


def _check_key(key: str, what: str) -> str:
    """A label or annotation key: [prefix/]name, prefix a DNS subdomain, name <= 63 characters; not reserved."""
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not re.fullmatch(_DNS_SUBDOMAIN, prefix))) or len(name) > 63 \
            or not re.fullmatch(_NAME, name):
        raise ValueError(f"{what} key {key!r} is not a valid key ([DNS-subdomain/]name, name <= 63 characters "
                         "of [A-Za-z0-9._-], alphanumeric at both ends)")
    if key in RESERVED_KEYS or key.startswith(RESERVED_PREFIXES):
        hint = " (use queue_name)" if key == QUEUE_LABEL else ""
        raise ValueError(f"{what} key {key!r} is reserved for the pipeline, the Job controller or Kueue{hint}")
    return key


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = "NoSchedule"


class LightProfile(BaseModel):
    """Placement and resources of the single-process stages (prepare, evaluate): one pod, no GPU."""

    model_config = ConfigDict(extra="forbid")
    cpu_request: str = "1"
    cpu_limit: str = "2"
    memory_request: str = "2Gi"
    memory_limit: str = "4Gi"
    shm_size: str = "1Gi"
    node_selector: dict[str, str] = {}
    """Empty by default: these stages must not hold a GPU node (the overlay's node_selector is not used)."""
    tolerations: list[Toleration] = []


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
    max_restarts: int = Field(3, ge=0)
    """New attempts (a new Job, all ranks, resuming from the last checkpoint) after a rank is lost:
    eviction/preemption (DisruptionTarget), node failure, a non-zero exit other than 2."""
    pending_timeout_seconds: float = Field(300, gt=0)
    """A pod still Pending (unschedulable, image pull, missing Secret...) after this long fails the stage
    with the scheduler's or kubelet's reason (StagePendingTimeout, not retried by the flow)."""
    collective_timeout_seconds: int = Field(300, ge=30)
    """torch.distributed timeout of the stage pods (PIPELINE_DDP_TIMEOUT_S): how long a rank waits in a
    collective, the first rendezvous included, for a peer that is not there. The launcher already stops
    every rank when one is lost; this bounds the wait when it cannot tell (a hung peer, a partitioned
    node). Not much lower: the pods of one Job may start minutes apart (image pulls)."""
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
    light: LightProfile = LightProfile()
    """Shape of prepare and evaluate (pipeline/launch/shape.py); the fields above shape pretrain/finetune."""
    # Cluster conventions (docs/kubernetes.md, "Cluster conventions").
    queue_name: str | None = None
    """Kueue LocalQueue: labels the Job `kueue.x-k8s.io/queue-name` and creates it with `suspend: true`,
    so Kueue admits all its pods at once (gang) when quota allows. Must be a valid label value."""
    priority_class_name: str | None = None
    """PriorityClass of the pods (Kueue also orders and preempts by it)."""
    image_pull_secrets: list[str] = []
    """Secrets (in the Jobs' namespace) for a private registry."""
    extra_labels: dict[str, str] = {}
    """Added to the Job, its pods and its Service (cost allocation, policies); cannot replace the pipeline's."""
    extra_annotations: dict[str, str] = {}
    """Added to the Job and its pods; cannot set the pipeline's or the Job controller's keys."""
    guaranteed_qos: bool = False
    """Render requests = limits for cpu and memory (the `*_limit` values): pods are in the Guaranteed QoS
    class, evicted last under node pressure. Explicit `*_request` values must then equal the limits."""

    @field_validator("image")
    @classmethod
    def _pinned(cls, image: str) -> str:
        if image.endswith(":latest") or (":" not in image.rsplit("/", 1)[-1] and "@" not in image):
            raise ValueError(f"image {image!r} must be pinned by tag or digest")
        return image

    @field_validator("queue_name")
    @classmethod
    def _queue(cls, name: str | None) -> str | None:
        if name is not None:
            _check_label_value(name, "queue_name")
            if not name:
                raise ValueError("queue_name must not be empty (omit it, or null, to run without Kueue)")
        return name

    @field_validator("priority_class_name")
    @classmethod
    def _priority(cls, name: str | None) -> str | None:
        return name if name is None else _check_dns_subdomain(name, "priority_class_name")

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, names: list[str]) -> list[str]:
        return [_check_dns_subdomain(n, "image_pull_secrets: Secret name") for n in names]

    @field_validator("extra_labels")
    @classmethod
    def _extra_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            _check_key(key, "extra_labels")
            _check_label_value(value, f"extra_labels[{key!r}]: value")
        return labels

    @field_validator("extra_annotations")
    @classmethod
    def _extra_annotations(cls, annotations: dict[str, str]) -> dict[str, str]:
        for key in annotations:
            _check_key(key, "extra_annotations")
        return annotations

    @model_validator(mode="after")
    def _guaranteed(self) -> "KubernetesLaunchConfig":
        if self.guaranteed_qos:
            for resource in ("cpu", "memory"):
                request, limit = getattr(self, f"{resource}_request"), getattr(self, f"{resource}_limit")
                if f"{resource}_request" in self.model_fields_set and request != limit:
                    raise ValueError(f"guaranteed_qos: {resource}_request {request!r} differs from {resource}_limit "
                                     f"{limit!r}; Guaranteed QoS needs requests = limits (omit the request or "
                                     "make them equal)")
        return self

    @classmethod
    def from_layers(cls, layers: list[tuple[str, dict[str, Any]]]) -> "KubernetesLaunchConfig":
        """Merge (source, values) layers, later ones winning key by key, and validate. ConfigError (exit 2)
        lists every problem, each naming the source that set the key: `k8s/overlays/gpu/launch.json: nodez:
        unknown key`."""
        merged: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for source, values in layers:
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: expected a JSON object of launch settings")
            merged.update(values)
            origin.update(dict.fromkeys(values, source))
        try:
            return cls(**merged)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(part) for part in err["loc"])
                source = origin.get(str(err["loc"][0]) if err["loc"] else "", layers[-1][0] if layers else "launch")
                message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
                problems.append(f"{source}: {key or '<root>'}: {message}")
            raise ConfigError(problems) from None

    @classmethod
    def from_env(cls, **overrides: Any) -> "KubernetesLaunchConfig":
        """$PIPELINE_K8S_CONFIG, then $PIPELINE_K8S_OVERRIDES (the overlay), then explicit overrides.
        Bad JSON, unknown keys or invalid values: ConfigError naming the variable and the key."""
        layers = []
        for name in CONFIG_ENVS:
            try:
                layers.append((f"${name}", json.loads(os.environ.get(name) or "{}")))
            except ValueError as exc:
                raise ConfigError(f"${name}: not valid JSON ({exc})") from None
        return cls.from_layers([*layers, ("overrides", overrides)])


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


def _labels(cfg: KubernetesLaunchConfig, stage: str, run_id: str, job_name: str) -> dict[str, str]:
    # extra_labels first: validation keeps them off the pipeline's keys, and these win regardless.
    return {**cfg.extra_labels, **MANAGED_BY, RUN_LABEL: label_value(run_id), STAGE_LABEL: label_value(stage),
            JOB_LABEL: job_name}


def _env(cfg: KubernetesLaunchConfig, job_name: str, run_id: str, extra: dict[str, str]) -> list[dict]:
    env = [{"name": k, "value": v} for k, v in sorted(extra.items())]
    env += [
        {"name": "MASTER_ADDR", "value": master_addr(job_name, cfg.namespace)},
        {"name": "MASTER_PORT", "value": str(cfg.master_port)},
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
        {"name": "PIPELINE_FLOW_RUN_ID", "value": run_id},
        {"name": "PIPELINE_DDP_TIMEOUT_S", "value": str(cfg.collective_timeout_seconds)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # lines reach the log stream as printed
        {"name": "HOME", "value": "/tmp"},  # libraries write caches under $HOME
    ]
    # WORLD_SIZE and RANK are left unset on purpose: with them plus KUBERNETES_PORT present,
    # Lightning would pick its Kubeflow environment and skip spawning per-GPU processes.
    return env


def _resources(cfg: KubernetesLaunchConfig) -> dict:
    if cfg.guaranteed_qos:  # Guaranteed QoS: requests = limits for every resource
        requests = {"cpu": cfg.cpu_limit, "memory": cfg.memory_limit}
    else:
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
    if cfg.priority_class_name:
        spec["priorityClassName"] = cfg.priority_class_name
    if cfg.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in cfg.image_pull_secrets]
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
    labels = _labels(cfg, stage, run_id, job_name)
    metadata: dict[str, Any] = {"name": job_name, "namespace": cfg.namespace, "labels": dict(labels)}
    pod_metadata: dict[str, Any] = {"labels": labels}
    if cfg.extra_annotations:
        metadata["annotations"] = dict(cfg.extra_annotations)
        pod_metadata["annotations"] = dict(cfg.extra_annotations)
    if cfg.queue_name:
        # Kueue: the queue label on the Job itself, created suspended; Kueue unsuspends it once the
        # whole Job (every pod) fits the queue's quota, so ranks never wait half-scheduled.
        metadata["labels"][QUEUE_LABEL] = cfg.queue_name
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
            # 0: any lost pod fails the Job, whose controller then stops the surviving ranks at once
            # (they would otherwise wait in a collective until the DDP timeout). The launcher restarts
            # the whole group as a new Job (max_restarts), as JobSet's failurePolicy does.
            "backoffLimit": 0,
            "activeDeadlineSeconds": cfg.active_deadline_seconds,
            "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
            "podFailurePolicy": {"rules": [
                # Exit 2 = bad config or data: retrying burns GPU-hours for the same error (no restart).
                {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER_NAME,
                                                      "operator": "In", "values": [2]}},
                # Preemption/eviction of any rank: end the attempt now, so the launcher restarts the
                # whole group from the checkpoint (not counted as a pod failure).
                {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            **({"suspend": True} if cfg.queue_name else {}),
            "template": {
                "metadata": pod_metadata,
                "spec": _pod_spec(cfg, job_name, stage, args, run_id, env or {}),
            },
        },
    }


def render_service(cfg: KubernetesLaunchConfig, job_name: str, stage: str, run_id: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": job_name, "namespace": cfg.namespace,
                     "labels": _labels(cfg, stage, run_id, job_name)},
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve pod 0 while it is still starting, before any readiness.
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: job_name},
            "ports": [{"name": "rendezvous", "port": cfg.master_port, "targetPort": cfg.master_port}],
        },
    }
