"""The kinds the stand-in serves, and the discovery documents kubectl reads before any request.

kubectl 1.32 asks /version, then /api and /apis (aggregated discovery first; a plain
APIVersions/APIGroupList answer makes it fall back to the legacy per-version lists), then
/api/v1 or /apis/<group>/<version> for the resource names, verbs and short names. Its
default `--validate=strict` also reads /openapi/v3 to learn that the server honours
`fieldValidation`: the stand-in answers with just that part of the OpenAPI document.
`kubectl get` asks for server-side Table rendering; tables() gives it a few columns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

SERVER_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-standin", "gitCommit": "standin",
                  "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23",
                  "compiler": "gc", "platform": "linux/amd64"}
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str  # also the store's key: unique across the groups served here
    kind: str
    namespaced: bool = True
    short: tuple = ()
    verbs: tuple = tuple(ALL_VERBS)
    categories: tuple = ()
    subresources: dict = field(default_factory=dict)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """How Status messages name it: `jobs.batch`, `pods`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


KINDS = [
    Kind("", "v1", "namespaces", "Namespace", namespaced=False, short=("ns",),
         verbs=("create", "delete", "get", "list", "patch", "update", "watch")),
    # Pods come from the Job controller only; clients read, watch and delete them.
    Kind("", "v1", "pods", "Pod", short=("po",), verbs=("delete", "deletecollection", "get", "list", "watch"),
         categories=("all",), subresources={"log": ("Pod", ("get",))}),
    Kind("", "v1", "services", "Service", short=("svc",), categories=("all",)),
    Kind("", "v1", "secrets", "Secret"),
    Kind("", "v1", "configmaps", "ConfigMap", short=("cm",)),
    # Written by the scheduler, kubelet and autoscaler of the stand-in; clients read and watch them.
    Kind("", "v1", "events", "Event", short=("ev",), verbs=("get", "list", "watch")),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", short=("sa",)),
    Kind("batch", "v1", "jobs", "Job", categories=("all",)),
    Kind("apps", "v1", "deployments", "Deployment", short=("deploy",), categories=("all",)),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short=("netpol",)),
]
BY_PATH = {(k.group, k.version, k.plural): k for k in KINDS}
BY_PLURAL = {k.plural: k for k in KINDS}
BY_KIND = {(k.api_version, k.kind): k for k in KINDS}
GROUP_VERSIONS = sorted({(k.group, k.version) for k in KINDS})


def api_versions(host: str) -> dict:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]}


def _group(group: str) -> dict:
    versions = [{"groupVersion": f"{g}/{v}", "version": v} for g, v in GROUP_VERSIONS if g == group]
    return {"name": group, "versions": versions, "preferredVersion": versions[0]}


def api_groups() -> dict:
    groups = sorted({g for g, _ in GROUP_VERSIONS if g})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group(g) for g in groups]}


def api_group(group: str) -> dict | None:
    if not any(g == group for g, _ in GROUP_VERSIONS):
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(group)}


def resource_list(group: str, version: str) -> dict | None:
    kinds = [k for k in KINDS if (k.group, k.version) == (group, version)]
    if not kinds:
        return None
    resources = []
    for k in kinds:
        resources.append({"name": k.plural, "singularName": k.kind.lower(), "namespaced": k.namespaced,
                          "kind": k.kind, "verbs": list(k.verbs), "shortNames": list(k.short),
                          "categories": list(k.categories)})
        for sub, (kind, verbs) in k.subresources.items():
            resources.append({"name": f"{k.plural}/{sub}", "singularName": "", "namespaced": k.namespaced,
                              "kind": kind, "verbs": list(verbs)})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": kinds[0].api_version,
            "resources": resources}


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def openapi_v3_root() -> dict:
    return {"paths": {_gv_path(g, v): {"serverRelativeURL": f"/openapi/v3/{_gv_path(g, v)}?hash=standin"}
                      for g, v in GROUP_VERSIONS}}


def openapi_v3(gv_path: str) -> dict | None:
    """Only what kubectl's field-validation probe reads: each kind's PATCH operation and its
    `fieldValidation` query parameter. No schemas: kubectl then leaves validation to the server."""
    kinds = [k for k in KINDS if _gv_path(k.group, k.version) == gv_path.strip("/")]
    if not kinds:
        return None
    paths = {}
    for k in kinds:
        scope = "/namespaces/{namespace}" if k.namespaced else ""
        paths[f"/{gv_path.strip('/')}{scope}/{k.plural}/{{name}}"] = {"patch": {
            "x-kubernetes-group-version-kind": {"group": k.group, "version": k.version, "kind": k.kind},
            "x-kubernetes-action": "patch",
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK"}}}}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
            "paths": paths, "components": {"schemas": {}}}


# ---- server-side printing (`kubectl get`) --------------------------------------------------
def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    seconds = int((datetime.now(timezone.utc) - datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ")
                   .replace(tzinfo=timezone.utc)).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _pod_row(pod: dict) -> list:
    status = pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    reason = status.get("phase", "Pending")
    for cs in statuses:  # as kubectl's pod printer: the container's reason wins over the phase
        state = cs.get("state") or {}
        if "waiting" in state:
            reason = state["waiting"].get("reason") or reason
        elif "terminated" in state:
            reason = state["terminated"].get("reason") or f"ExitCode:{state['terminated'].get('exitCode')}"
    if pod["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    ready = sum(1 for cs in statuses if cs.get("ready"))
    total = len((pod.get("spec") or {}).get("containers") or [])
    return [f"{ready}/{total}", reason, sum(cs.get("restartCount", 0) for cs in statuses)]


def _job_row(job: dict) -> list:
    status, spec = job.get("status") or {}, job.get("spec") or {}
    conditions = {c["type"] for c in status.get("conditions") or [] if c.get("status") == "True"}
    state = "Complete" if "Complete" in conditions else "Failed" if "Failed" in conditions else "Running"
    return [state, f"{status.get('succeeded', 0)}/{spec.get('completions') or 1}"]


COLUMNS = {"pods": (["Ready", "Status", "Restarts"], _pod_row), "jobs": (["Status", "Completions"], _job_row)}


def table(plural: str, objects: list[dict], resource_version: str) -> dict:
    extra, row = COLUMNS.get(plural, ([], lambda obj: []))
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
    columns += [{"name": n, "type": "string", "format": "", "description": "", "priority": 0} for n in extra]
    columns.append({"name": "Age", "type": "string", "format": "", "description": "", "priority": 0})
    rows = [{"cells": [o["metadata"]["name"], *row(o), _age(o["metadata"].get("creationTimestamp"))],
             "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}}
            for o in objects]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": columns, "rows": rows}
