"""KubernetesLaunchConfig: where and how a stage runs on Kubernetes, validated before any Job exists.

Loaded from the launch ConfigMap `training-launch` (k8s/base/launch-base.json + the overlay's
launch.json, received by flow-run pods as $PIPELINE_K8S_CONFIG / $PIPELINE_K8S_OVERRIDES), flow
parameters or explicit values. Rendering lives in pipeline/launch/k8s_manifests.py, which re-exports
everything here.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

LABEL_PREFIX = "pipeline.example"
MANAGED_BY = {"app.kubernetes.io/managed-by": "pipeline-launcher"}
# JSON of KubernetesLaunchConfig fields: base values, then the overlay's (k8s/ ConfigMap training-launch).
CONFIG_ENVS = ("PIPELINE_K8S_CONFIG", "PIPELINE_K8S_OVERRIDES")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Keys extra_labels/extra_annotations may not set: the pipeline's own, the Job controller's, and Kueue's
# queue label (set it with queue_name, which also creates the Job suspended).
RESERVED_PREFIXES = (f"{LABEL_PREFIX}/", "batch.kubernetes.io/")
RESERVED_KEYS = (*MANAGED_BY, QUEUE_LABEL, "controller-uid", "job-name")
# Env the launcher sets on every stage pod (extra_env may not set these): rendezvous, ranks, limits. WORLD_SIZE,
# RANK and LOCAL_RANK stay unset on purpose: with them Lightning would not spawn its per-GPU processes.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "PIPELINE_FLOW_RUN_ID", "PIPELINE_DDP_TIMEOUT_S",
                "PIPELINE_RENDEZVOUS_TIMEOUT_S", "PYTHONUNBUFFERED", "HOME", "WORLD_SIZE", "RANK", "LOCAL_RANK")
_ENV_NAME = r"[-._a-zA-Z][-._a-zA-Z0-9]*"
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


class PodResources(BaseModel):
    """Placement and resources of one kind of pod: the training pods (KubernetesLaunchConfig's own fields) and
    the single-process stages' (`light`) use this one model, so light_config copies it as a whole."""

    model_config = ConfigDict(extra="forbid")
    node_selector: dict[str, str] = {}
    """E.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"} to pick the GPU type."""
    tolerations: list[Toleration] = []
    cpu_request: str = "1"
    cpu_limit: str = "2"
    memory_request: str = "2Gi"
    memory_limit: str = "4Gi"
    shm_size: str = "1Gi"
    """/dev/shm size: NCCL and torch.distributed share memory through it on one node; the container default
    (64Mi) is too small for them."""
    runtime_class_name: str | None = None
    """`runtimeClassName`, e.g. `nvidia` where the NVIDIA runtime is not the node's default."""

    @field_validator("runtime_class_name")
    @classmethod
    def _runtime_class(cls, name: str | None, info) -> str | None:
        return name if name is None else _check_dns_subdomain(name, info.field_name)


class LightProfile(PodResources):
    """Placement and resources of the single-process stages (prepare, corpus, evaluate): one pod, no GPU.

    node_selector and runtime_class_name stay empty by default: the training pods' would pin these pods to
    GPU nodes."""


class KubernetesLaunchConfig(PodResources):
    """Where and how a stage runs on Kubernetes; its PodResources fields are the training pods'. Loaded from
    the launch ConfigMap (the CONFIG_ENVS env vars that the k8s/ overlays set on flow-run pods), flow
    parameters or explicit values."""

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
    active_deadline_seconds: int = Field(6 * 3600, ge=1)
    ttl_seconds_after_finished: int = Field(3600, ge=0)
    max_restarts: int = Field(3, ge=0)
    """New attempts (a new Job, all ranks, resuming from the last checkpoint) after a rank is lost:
    eviction/preemption (DisruptionTarget), node failure, a non-zero exit other than 2."""
    pending_timeout_seconds: float = Field(300, gt=0)
    """How long a pod may stay Pending with no sign of progress (no reason reported yet, a FailedMount, an
    Unschedulable pod within scale_up_grace_seconds) before the stage fails with the scheduler's or
    kubelet's reason (StagePendingTimeout, not retried by the flow). Pulls and scale-ups are progress
    (startup_timeout_seconds); a pod that can never start fails sooner (below)."""
    startup_timeout_seconds: float = Field(1800, gt=0)
    """How long a pod may take to start while it visibly progresses: its image pulling (ContainerCreating),
    or Unschedulable with a cluster-autoscaler `TriggeredScaleUp` event (a GPU node being provisioned,
    often 5-15 min with driver install, then a 6-7 GiB pull). Past it the stage fails naming the reason.
    Preflight's wait for rank 0 on the other ranks follows it (PIPELINE_RENDEZVOUS_TIMEOUT_S = this + 120)."""
    failure_confirm_seconds: float = Field(5, ge=0)
    """A pod that can never start (ErrImagePull, ImagePullBackOff, InvalidImageName,
    CreateContainerConfigError, Unschedulable with no scale-up possible) fails the stage once the same
    verdict has held this long over two polls at least; a momentary state is not enough."""
    scale_up_grace_seconds: float = Field(20, ge=0)
    """An Unschedulable pod with no cluster-autoscaler event after this long counts as one no scale-up can
    help (a cluster without an autoscaler, or a request no node group fits: `NotTriggerScaleUp` says so
    at once)."""
    admission_timeout_seconds: float = Field(3600, gt=0)
    """How long a Job queued by Kueue (created suspended, see queue_name) may wait for admission; then the
    stage fails saying so and the Job is deleted."""
    collective_timeout_seconds: int = Field(300, ge=30)
    """torch.distributed timeout of the stage pods (PIPELINE_DDP_TIMEOUT_S): how long a rank waits in a
    collective, the first rendezvous included, for a peer that is not there. The launcher already stops
    every rank when one is lost; this bounds the wait when it cannot tell (a hung peer, a partitioned
    node). Not much lower: the pods of one Job may start minutes apart (image pulls)."""
    termination_grace_seconds: int = Field(60, ge=0)
    """Time between SIGTERM and SIGKILL: long enough for the stage to write its checkpoint."""
    master_port: int = Field(29500, ge=1, le=65535)
    cluster_domain: str = "cluster.local"
    """The cluster's DNS domain (kubelet `clusterDomain`): MASTER_ADDR is `<job>-0.<job>.<ns>.svc.<domain>`."""
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
    extra_env: dict[str, str] = {}
    """Env of every stage pod (light ones too), e.g. NCCL_SOCKET_IFNAME, NCCL_DEBUG,
    AWS_REQUEST_CHECKSUM_CALCULATION=when_required (docs/s3.md). Wins over the Secret's (envFrom); may not
    set what the launcher sets (LAUNCHER_ENV: MASTER_ADDR, NODE_RANK...)."""
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

    @field_validator("cluster_domain")
    @classmethod
    def _dns_names(cls, name: str | None, info) -> str | None:
        return name if name is None else _check_dns_subdomain(name, info.field_name)

    @field_validator("extra_env")
    @classmethod
    def _extra_env(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not re.fullmatch(_ENV_NAME, name):
                raise ValueError(f"extra_env: {name!r} is not a valid environment variable name "
                                 "([-._a-zA-Z][-._a-zA-Z0-9]*)")
            if name in LAUNCHER_ENV:
                raise ValueError(f"extra_env: {name} is set by the launcher on every stage pod (rendezvous, ranks, "
                                 f"limits) and cannot be overridden; reserved: {', '.join(LAUNCHER_ENV)}")
        return env

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
