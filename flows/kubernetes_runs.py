"""What a flow run owns on Kubernetes, and what it must clean up: no GPU pod outlives its flow run.

- a run that is cancelled or crashes deletes its stage Jobs (the flow's state hooks);
- a run that starts again (prefect-kubernetes reschedules a flow run whose pod got SIGTERM: same flow
  run id, a new flow-run pod) first stops what its previous attempt launched, and waits until those
  pods are gone, so two attempts never write the same outputs;
- Jobs of flow runs that ended without their hooks running (worker lost, OOM-killed) are deleted: the
  run ids on the namespace's Jobs are looked up in Prefect, so every such Job is found, however many
  runs the server holds.
"""
from __future__ import annotations

import uuid
from pathlib import Path

from prefect import get_run_logger

from flows.parameters import TrainingParameters
from pipeline import storage
from pipeline.config import Config
from pipeline.errors import ConfigError, UserInputError


def delete_jobs_hook(flow, flow_run, state) -> None:
    """on_cancellation / on_crashed."""
    params = TrainingParameters.model_validate(flow_run.parameters.get("params") or {})
    if params.launcher != "kubernetes":
        return
    from pipeline.launch import k8s_api, k8s_cleanup
    from pipeline.launch.k8s_settings import KubernetesLaunchConfig

    namespace = KubernetesLaunchConfig.from_env().namespace
    k8s_cleanup.delete_jobs_for_run(str(flow_run.id), namespace, k8s_api.default_api_client())


def prepare_namespace(params: TrainingParameters, run_id: str) -> None:
    """Before the first stage Job: the previous attempt's Jobs stopped, other runs' orphans deleted."""
    if params.launcher != "kubernetes":
        return
    from pipeline.launch import k8s_api, k8s_cleanup
    from pipeline.launch.k8s_manifests import label_value
    from pipeline.launch.k8s_settings import KubernetesLaunchConfig

    cfg, log = KubernetesLaunchConfig.from_env(), get_run_logger().info
    api = k8s_api.default_api_client()
    stopped = k8s_cleanup.stop_jobs_of_run(run_id, cfg.namespace, cfg.termination_grace_seconds + 120, api, log)
    if stopped:
        log(f"stopped the previous attempt's stage Jobs {stopped} before starting again")
    others = k8s_cleanup.job_run_ids(cfg.namespace, api, log) - {label_value(run_id)}
    alive = [run_id, *_alive(others)]
    k8s_cleanup.cleanup_orphans(cfg.namespace, alive, api, log=log)


def _alive(label_values: set[str]) -> list[str]:
    """Of the flow runs these Job labels name, those Prefect knows and that have not finished."""
    ids = []
    for value in label_values:
        try:
            ids.append(uuid.UUID(value))
        except ValueError:
            continue  # not a flow run id: nothing alive owns it
    if not ids:
        return []
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids))
    return [str(run.id) for run in runs if run.state is None or not run.state.is_final()]


def check_kubernetes_storage(cfg: Config, project: Path) -> None:
    """Flow-run pods keep nothing: artifacts and the registry must be on storage every pod reaches,
    with credentials that work (the S3 Secret, or IRSA). Exit 2 naming what is missing, before any Job."""
    registry = cfg.paths.project_uri("registry", project)
    problems = []
    if not storage.is_remote(cfg.paths.root):
        problems.append("paths.root: launcher=kubernetes needs artifacts on storage every pod can reach "
                        "(e.g. s3://bucket/prefix); pods cannot write into this workspace")
    if not storage.is_remote(registry):
        problems.append(f"paths.registry: {registry!r} is inside the flow-run pod, which is thrown away after the "
                        "run; set it to s3://bucket/prefix so the champion and last evaluation persist")
    if problems:
        raise ConfigError(problems)
    remote = cfg.paths.project_uri("dvc_remote", project)
    try:
        storage.check_buckets([cfg.paths.root, registry, *([remote] if storage.is_remote(remote) else [])])
    except UserInputError as exc:
        from pipeline.launch.k8s_settings import KubernetesLaunchConfig

        secret = KubernetesLaunchConfig.from_env().env_from_secret
        hint = (f"the flow-run pod reads S3 credentials from Secret {secret!r} (docs/kubernetes.md, step 2)"
                if secret else "no Secret is configured (env_from_secret: null): IRSA/workload identity must apply")
        raise type(exc)([*exc.problems, hint]) from None
