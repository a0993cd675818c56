"""The stage Jobs of a flow run, found by label and deleted: on cancel, before a restarted run
starts again, and for orphans whose flow run is gone (a crashed worker or flow).

Deletion is Foreground: a Job object stays until its pods are gone, so "no Job" means "no pods".
The API client is looked up through k8s_api at call time, so one replaced client serves every caller.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from kubernetes import client as k8s

from pipeline.launch import k8s_api
from pipeline.launch.k8s_manifests import RUN_LABEL, label_value
from pipeline.launch.k8s_settings import MANAGED_BY


def delete_job(batch: k8s.BatchV1Api, core: k8s.CoreV1Api, namespace: str, job_name: str,
               log: Callable[[str], None] = print) -> None:
    """Foreground: the Job object stays until its pods are gone, so 'no Job' means 'no pods'."""
    body = k8s.V1DeleteOptions(propagation_policy="Foreground")
    for kind, fn in (("jobs.batch", batch.delete_namespaced_job),
                     ("services", core.delete_namespaced_service)):
        try:  # deleting is idempotent, so transient errors are retried like reads
            k8s_api.call_api("delete", kind, namespace, fn, job_name, namespace, body=body, name=job_name, log=log)
        except (k8s_api.KubernetesLaunchError, k8s_api.KubernetesApiUnavailable) as err:
            if getattr(err, "status", None) != 404:  # already gone is the goal; anything else is worth a line
                log(f"could not delete {kind} {namespace}/{job_name}: {err}")


def delete_jobs_for_run(run_id: str, namespace: str, api_client: k8s.ApiClient | None = None,
                        log: Callable[[str], None] = print) -> list[str]:
    """Delete every stage Job (and Service) of one flow run; returns the Job names."""
    return _delete_where(namespace, api_client, log, lambda labels: labels.get(RUN_LABEL) == label_value(run_id))


def job_run_ids(namespace: str, api_client: k8s.ApiClient | None = None,
                log: Callable[[str], None] = print) -> set[str]:
    """The flow run ids (label values) that launcher Jobs in `namespace` belong to."""
    batch = k8s.BatchV1Api(api_client or k8s_api.default_api_client())
    selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    jobs = k8s_api.call_api("list", "jobs.batch", namespace, batch.list_namespaced_job, namespace,
                    label_selector=selector, log=log).items
    return {(j.metadata.labels or {}).get(RUN_LABEL) for j in jobs} - {None}


def stop_jobs_of_run(run_id: str, namespace: str, timeout_s: float, api_client: k8s.ApiClient | None = None,
                     log: Callable[[str], None] = print) -> list[str]:
    """Delete the flow run's stage Jobs and wait until they are gone: Foreground deletion keeps a Job until
    its pods have ended, so afterwards no pod of theirs can write. Raises KubernetesLaunchError past timeout_s."""
    api = api_client or k8s_api.default_api_client()
    doomed = delete_jobs_for_run(run_id, namespace, api, log)
    deadline = time.monotonic() + timeout_s
    while doomed and label_value(run_id) in job_run_ids(namespace, api, log):
        if time.monotonic() > deadline:
            raise k8s_api.KubernetesLaunchError(f"the previous attempt's Jobs {doomed} in {namespace} were still there "
                                        f"{timeout_s:g} s after their deletion")
        time.sleep(1.0)
    return doomed


def cleanup_orphans(namespace: str, flow_run_ids_alive: Iterable[str],
                    api_client: k8s.ApiClient | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Delete launcher Jobs whose flow run is no longer alive (crashed worker or flow)."""
    alive = {label_value(r) for r in flow_run_ids_alive}
    return _delete_where(namespace, api_client, log, lambda labels: labels.get(RUN_LABEL) not in alive)


def _delete_where(namespace, api_client, log, wanted: Callable[[dict], bool]) -> list[str]:
    api = api_client or k8s_api.default_api_client()
    batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    jobs = k8s_api.call_api("list", "jobs.batch", namespace, batch.list_namespaced_job, namespace,
                    label_selector=selector, log=log).items
    doomed = [j.metadata.name for j in jobs if wanted(j.metadata.labels or {})]
    for name in doomed:
        log(f"deleting orphaned Job {namespace}/{name}")
        delete_job(batch, core, namespace, name, log)
    return doomed
