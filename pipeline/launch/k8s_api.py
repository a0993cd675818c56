"""Kubernetes API requests answered as the API means them, and the client that makes them.

429, 5xx and dropped connections are transient (an API server restarting, a rate limit): every
request is retried with exponential backoff (Retry-After honoured), creates included, which are
made idempotent by name, so one failed status read never deletes a running Job. RBAC (403) and
schema or quota (422) errors raise KubernetesLaunchError at once, naming verb, resource and
object: retrying cannot fix either, and the flow does not retry them.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as TransportError

from pipeline.launch.k8s_manifests import owner_reference

ROLE_FILE = "k8s/base/rbac.yaml"
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
# The flow-run pod learns its own Job from the downward API (k8s/base/base-job-template.json).
OWNER_ENVS = ("PIPELINE_OWNER_JOB_NAME", "PIPELINE_OWNER_JOB_UID")


class KubernetesLaunchError(RuntimeError):
    """The API refused a request in a way no retry can fix (RBAC, schema, quota)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class KubernetesApiUnavailable(RuntimeError):
    """The API kept answering 429/5xx or dropping the connection after every retry: infrastructure."""


def _explain(err: ApiException, verb: str, resource: str, namespace: str,
             name: str | None = None) -> KubernetesLaunchError:
    try:
        body = json.loads(err.body or "{}")
    except ValueError:
        body = {}
    message = body.get("message") or err.reason
    what = f" ({resource.split('.')[0][:-1]} {name!r})" if name else ""
    if err.status == 403:
        return KubernetesLaunchError(
            f"forbidden: cannot {verb} {resource} in namespace {namespace!r}{what} — check the Role "
            f"pipeline-flow-run in {ROLE_FILE} and that the flow-run pod uses its ServiceAccount "
            f"(API said: {message})", err.status)
    if err.status == 422:
        fields = [c.get("field", "?") for c in body.get("details", {}).get("causes", [])]
        return KubernetesLaunchError(
            f"invalid: the API rejected {verb} {resource} in namespace {namespace!r}{what}; "
            f"field(s) {', '.join(fields) or 'unknown'} (API said: {message})", err.status)
    return KubernetesLaunchError(f"{verb} {resource} in namespace {namespace!r}{what} failed: "
                                 f"HTTP {err.status} {message}", err.status)


def _retry_after(err: ApiException) -> float | None:
    try:
        return float((err.headers or {}).get("Retry-After"))
    except (TypeError, ValueError):
        return None


def call_api(verb: str, resource: str, namespace: str, fn: Callable, *args, name: str | None = None,
             attempts: int = 6, log: Callable[[str], None] = print, on_conflict: Callable | None = None,
             **kwargs):
    """One API request with the retries the API's answer calls for (the module docstring says which).

    `on_conflict`: for a create retried after a lost answer, 409 AlreadyExists means the first try
    went through; it returns the existing object instead of failing.
    """
    delay = 0.5
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except ApiException as err:
            if err.status == 409 and attempt > 1 and on_conflict is not None:
                return on_conflict()
            if err.status not in TRANSIENT_STATUS:
                raise _explain(err, verb, resource, namespace, name) from None
            reason, wait = f"HTTP {err.status} {err.reason}", _retry_after(err) or delay
        except TransportError as err:  # connection refused or reset, timeout: nothing was answered
            reason, wait = f"{type(err).__name__}: {err}", delay
        if attempt == attempts:
            raise KubernetesApiUnavailable(f"{verb} {resource} in namespace {namespace!r} failed {attempts} "
                                           f"times; last: {reason}")
        log(f"Kubernetes API: {verb} {resource} answered {reason}; retry {attempt}/{attempts - 1} in {wait:.1f} s")
        time.sleep(wait)
        delay = min(delay * 2, 8.0)


def owner_from_env() -> dict | None:
    """ownerReference to the flow-run Job this process runs in (None outside a flow-run pod)."""
    name, uid = (os.environ.get(key) for key in OWNER_ENVS)
    return owner_reference("Job", name, uid) if name and uid else None


def default_api_client() -> k8s.ApiClient:
    """In-cluster credentials inside a flow-run pod, else the local kubeconfig."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return k8s.ApiClient()

