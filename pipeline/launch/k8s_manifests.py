"""Pure rendering of a stage's Kubernetes objects: an indexed Job plus a headless Service.

No API calls here, so tests validate the exact dicts the launcher sends against the
official schemas offline (kubernetes-validate, strict). One pod per node; each pod runs
`python -m pipeline <stage> ...` and Lightning spawns `gpus_per_node` processes inside it.

Rendezvous: an indexed Job names pod i's hostname `<job>-<i>`; with `subdomain` set to a
headless Service of the same name, pod 0 resolves as `<job>-0.<job>.<ns>.svc.<cluster_domain>`.
"""
from __future__ import annotations

import re
import secrets
from typing import Any

from pipeline.launch.k8s_settings import LABEL_PREFIX, MANAGED_BY, QUEUE_LABEL, KubernetesLaunchConfig

# The oldest API version whose schemas the manifests must satisfy: podFailurePolicy is GA
# since 1.31 and the managed clusters we target run 1.32+.
K8S_SCHEMA_VERSION = "1.32.0"
CONTAINER_NAME = "trainer"
RUN_LABEL = f"{LABEL_PREFIX}/flow-run-id"
STAGE_LABEL = f"{LABEL_PREFIX}/stage"
JOB_LABEL = f"{LABEL_PREFIX}/job"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def _dns_label(text: str, limit: int) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:limit].rstrip("-") or "x"


def label_value(text: str) -> str:
    """Label values: <=63 chars of [A-Za-z0-9._-], alphanumeric at both ends."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63].strip("-._") or "none"


def new_job_name(stage: str, run_id: str) -> str:
    # <=52 chars so the pod hostname `<job>-<index>` and generated pod names stay <=63.
    return f"{_dns_label(stage, 12)}-{_dns_label(run_id, 24)}-{secrets.token_hex(3)}"


def master_addr(job_name: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    return f"{job_name}-0.{job_name}.{namespace}.svc.{cluster_domain}"


def trainer_args(cfg: KubernetesLaunchConfig) -> list[str]:
    """Lightning settings that make world size = nodes x devices on every rank (DDP follows from the config's
    own rule, TrainerConfig._ddp_when_distributed)."""
    devices = max(cfg.gpus_per_node, 1)
    args = {"trainer.num_nodes": cfg.nodes, "trainer.devices": devices,
            "trainer.accelerator": "gpu" if cfg.gpus_per_node else "cpu"}
    return [part for key, value in args.items() for part in ("--set", f"{key}={value}")]


def _labels(cfg: KubernetesLaunchConfig, stage: str, run_id: str, job_name: str) -> dict[str, str]:
    # extra_labels first: validation keeps them off the pipeline's keys, and these win regardless.
    return {**cfg.extra_labels, **MANAGED_BY, RUN_LABEL: label_value(run_id), STAGE_LABEL: label_value(stage),
            JOB_LABEL: job_name}


def rendezvous_timeout(cfg: KubernetesLaunchConfig) -> float:
    """Preflight's wait on ranks > 0 for rank 0 (PIPELINE_RENDEZVOUS_TIMEOUT_S): rank 0 may take up to the
    startup limit to start (the launcher fails the stage past it), then its process start-up."""
    return cfg.startup_timeout_seconds + 120


def _env(cfg: KubernetesLaunchConfig, job_name: str, run_id: str, extra: dict[str, str]) -> list[dict]:
    """extra_env, then the command's env, then the launcher's own (one entry per name: the later wins)."""
    own = {
        "MASTER_ADDR": master_addr(job_name, cfg.namespace, cfg.cluster_domain),
        "MASTER_PORT": str(cfg.master_port),
        "NODE_RANK": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        "PIPELINE_FLOW_RUN_ID": run_id,
        "PIPELINE_DDP_TIMEOUT_S": str(cfg.collective_timeout_seconds),
        "PIPELINE_RENDEZVOUS_TIMEOUT_S": f"{rendezvous_timeout(cfg):g}",
        "PYTHONUNBUFFERED": "1",  # lines reach the log stream as printed
        "HOME": "/tmp",  # libraries write caches under $HOME
    }
    given = {**cfg.extra_env, **extra}
    env = [{"name": k, "value": v} for k, v in sorted(given.items()) if k not in own]
    env += [{"name": k, **({"valueFrom": v} if isinstance(v, dict) else {"value": v})} for k, v in own.items()]
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
    if cfg.runtime_class_name:
        spec["runtimeClassName"] = cfg.runtime_class_name
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
