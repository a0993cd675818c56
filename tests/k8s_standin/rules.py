"""API-server rules a JSON schema cannot express, and the defaults the server fills in.

Each rule is taken from kubernetes' own validation (pkg/apis/core/validation,
pkg/apis/batch/validation, apimachinery's name and label validation) with its field path
and message wording, so a 422 from the stand-in reads like one from a cluster. Only the
rules that matter to what this project sends are here; the rest of the server's checks
are a documented gap (docs/kubernetes.md).
"""
from __future__ import annotations

import base64
import re

DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*"
DNS1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"
QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
CONFIG_KEY = r"[-._a-zA-Z0-9]+"
MSG = {
    "label": ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
              "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
              f"validation is '{DNS1123_LABEL}')"),
    "subdomain": ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                  "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                  f"validation is '{DNS1123_SUBDOMAIN}')"),
    "dns1035": ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
                f"regex used for validation is '{DNS1035_LABEL}')"),
    "label_value": ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
                    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  "
                    f"or '12345', regex used for validation is '{LABEL_VALUE}')"),
    "qualified": ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                  "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                  f"validation is '{QUALIFIED_NAME}')"),
    "config_key": ("a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  "
                   f"or 'KEY_NAME',  or 'key-name', regex used for validation is '{CONFIG_KEY}')"),
}
# metadata.name validation per kind (ValidateObjectMeta's nameFn in the real code).
NAME_RULES = {"Namespace": ("label", 63), "Service": ("dns1035", 63)}
PATH_SEGMENT_NAMES = {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def _q(value) -> str:
    """A bad value as field.Invalid prints it: strings quoted, numbers bare."""
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def invalid(path: str, value, detail: str) -> tuple[str, str]:
    return path, f"Invalid value: {_q(value)}: {detail}"


def name_problems(kind: str, name: str, path: str = "metadata.name") -> list[tuple[str, str]]:
    if kind in PATH_SEGMENT_NAMES:
        bad = name in (".", "..") or "/" in name or "%" in name
        return [invalid(path, name, "may not contain '/' or '%' and may not be '.' or '..'")] if bad else []
    style, limit = NAME_RULES.get(kind, ("subdomain", 253))
    regex = {"label": DNS1123_LABEL, "dns1035": DNS1035_LABEL, "subdomain": DNS1123_SUBDOMAIN}[style]
    problems = []
    if len(name) > limit:
        problems.append(invalid(path, name, f"must be no more than {limit} characters"))
    if not re.fullmatch(regex, name):
        problems.append(invalid(path, name, MSG[style]))
    return problems


def label_problems(labels: dict, path: str) -> list[tuple[str, str]]:
    problems = []
    for key, value in (labels or {}).items():
        prefix, _, name = key.rpartition("/")
        bad_prefix = prefix and not re.fullmatch(DNS1123_SUBDOMAIN, prefix)
        if len(name) > 63 or not re.fullmatch(QUALIFIED_NAME, name) or bad_prefix:
            problems.append(invalid(path, key, MSG["qualified"]))
        if not isinstance(value, str):
            continue
        if len(value) > 63:
            problems.append(invalid(path, value, "must be no more than 63 characters"))
        if not re.fullmatch(LABEL_VALUE, value):
            problems.append(invalid(path, value, MSG["label_value"]))
    return problems


def api_rules(obj: dict) -> list[tuple[str, str]]:
    """API-server validations that a JSON schema cannot express: (field, message) pairs, each
    message in the server's `Invalid value: ...` / `Required value: ...` form."""
    kind, meta = obj.get("kind"), obj.get("metadata") or {}
    name = meta.get("name") or ""
    problems = []
    if not name:
        problems.append(("metadata.name", "Required value: name or generateName is required"))
    else:
        problems += name_problems(kind, name)
    problems += label_problems(meta.get("labels"), "metadata.labels")
    spec = obj.get("spec") or {}
    if kind == "Job":
        problems += _job(spec, name)
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        problems += _pod_template(spec.get("template") or {}, "spec.template")
    elif kind == "Pod":
        problems += _pod_spec(spec, "spec")
    elif kind == "Service":
        problems += _service(spec)
    elif kind in ("ConfigMap", "Secret"):
        for key in list(obj.get("data") or {}) + list(obj.get("binaryData") or {}) + list(obj.get("stringData") or {}):
            if not re.fullmatch(CONFIG_KEY, key) or len(key) > 253:
                problems.append(invalid(f"data[{key}]", key, MSG["config_key"]))
    return problems


def _nonnegative(spec: dict, path: str, *names: str) -> list[tuple[str, str]]:
    return [invalid(f"{path}.{n}", spec[n], "must be greater than or equal to 0")
            for n in names if isinstance(spec.get(n), int) and spec[n] < 0]


def _job(spec: dict, name: str) -> list[tuple[str, str]]:
    problems = _nonnegative(spec, "spec", "parallelism", "completions", "activeDeadlineSeconds", "backoffLimit",
                            "ttlSecondsAfterFinished", "backoffLimitPerIndex", "maxFailedIndexes")
    indexed = spec.get("completionMode") == "Indexed"
    if indexed and spec.get("completions") is None:
        problems.append(("spec.completions", "Required value: when completion mode is Indexed"))
    if indexed and spec.get("completions") and name:
        # The controller names pod i's host `<job>-<i>`: that must stay a DNS label.
        host = f"{name}-{spec['completions'] - 1}"
        if not re.fullmatch(DNS1123_LABEL, host) or len(host) > 63:
            problems.append(invalid("metadata.name", name,  # sic: the server's wording
                                    f"will not able to create pod with invalid DNS label: {host}"))
    if len(name) > 63:  # the controller labels every pod with job-name=<name>
        problems.append(invalid("spec.template.labels", name, "must be no more than 63 characters"))
    if not indexed and spec.get("backoffLimitPerIndex") is not None:
        problems.append(invalid("spec.backoffLimitPerIndex", spec["backoffLimitPerIndex"],
                                "requires indexed completion mode"))
    pod = (spec.get("template") or {}).get("spec") or {}
    policy = spec.get("podFailurePolicy")
    if policy:
        problems += _pod_failure_policy(policy, spec, pod)
    restart = pod.get("restartPolicy")
    if restart in (None, "", "Always"):
        problems.append(("spec.template.spec.restartPolicy", 'Required value: valid values: "OnFailure", "Never"'))
    elif restart not in ("OnFailure", "Never"):
        problems.append(("spec.template.spec.restartPolicy",
                         f'Unsupported value: {_q(restart)}: supported values: "OnFailure", "Never"'))
    elif policy and restart != "Never":
        problems.append(invalid("spec.template.spec.restartPolicy", restart,
                                'only "Never" is supported when podFailurePolicy is specified'))
    return problems + _pod_template(spec.get("template") or {}, "spec.template")


def _pod_failure_policy(policy: dict, spec: dict, pod: dict) -> list[tuple[str, str]]:
    problems = []
    names = {c.get("name") for c in (pod.get("containers") or []) + (pod.get("initContainers") or [])}
    for i, rule in enumerate(policy.get("rules") or []):
        path = f"spec.podFailurePolicy.rules[{i}]"
        action = rule.get("action")
        if action == "FailIndex" and spec.get("backoffLimitPerIndex") is None:
            problems.append(invalid(f"{path}.action", action, "requires the backoffLimitPerIndex to be set"))
        elif action not in ("Count", "FailIndex", "FailJob", "Ignore"):
            problems.append((f"{path}.action", f'Unsupported value: {_q(action)}: supported values: '
                                               '"Count", "FailIndex", "FailJob", "Ignore"'))
        codes, conditions = rule.get("onExitCodes"), rule.get("onPodConditions")
        if codes and conditions:
            problems.append((path, "Invalid value: specifying both OnExitCodes and OnPodConditions is not supported"))
        if not codes and not conditions:
            problems.append((path, "Invalid value: specifying one of OnExitCodes and OnPodConditions is required"))
        if not codes:
            continue
        cpath, values = f"{path}.onExitCodes", codes.get("values") or []
        if codes.get("containerName") is not None and codes["containerName"] not in names:
            problems.append(invalid(f"{cpath}.containerName", codes["containerName"],
                                    "must be one of the container or initContainer names in the pod template"))
        if not values:
            problems.append(invalid(f"{cpath}.values", "[]", "at least one value is required"))
        for j, value in enumerate(values):
            if codes.get("operator") == "In" and value == 0:
                problems.append(invalid(f"{cpath}.values[{j}]", value, "must not be 0 for the In operator"))
            if value in values[:j]:
                problems.append((f"{cpath}.values[{j}]", f"Duplicate value: {value}"))
        if values != sorted(values):
            problems.append(invalid(f"{cpath}.values", values, "must be ordered"))
    return problems


def _pod_template(template: dict, path: str) -> list[tuple[str, str]]:
    labels = (template.get("metadata") or {}).get("labels")
    return label_problems(labels, f"{path}.metadata.labels") + _pod_spec(template.get("spec") or {}, f"{path}.spec")


def _pod_spec(spec: dict, path: str) -> list[tuple[str, str]]:
    problems = [] if spec.get("containers") else [(f"{path}.containers", "Required value")]
    for field in ("hostname", "subdomain"):
        if spec.get(field):
            problems += [(f"{path}.{field}", msg) for _, msg in name_problems("Namespace", spec[field], field)]
    seen = set()
    for group in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(group) or []):
            cpath = f"{path}.{group}[{i}]"
            if container.get("name") in seen:
                problems.append((f"{cpath}.name", f'Duplicate value: {_q(container.get("name"))}'))
            seen.add(container.get("name"))
            problems += _resources(container.get("resources") or {}, f"{cpath}.resources")
    return problems


def _overcommit_allowed(resource: str) -> bool:
    """Native resources (no domain, or *.kubernetes.io) may overcommit; extended ones and hugepages not."""
    native = "/" not in resource or "kubernetes.io/" in resource
    return native and not resource.startswith("hugepages-")


def _resources(resources: dict, path: str) -> list[tuple[str, str]]:
    """validateResourceRequirements: extended resources are whole numbers, request == limit."""
    problems = []
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for kind, values in (("limits", limits), ("requests", requests)):
        for name, value in values.items():
            if not _overcommit_allowed(name) and "/" in name and _quantity(value) is not None \
                    and _quantity(value) != int(_quantity(value)):
                problems.append(invalid(f"{path}.{kind}[{name}]", str(value), "must be an integer"))
    for name, value in requests.items():
        if _overcommit_allowed(name):
            continue
        if name not in limits:
            problems.append((f"{path}.limits", "Required value: Limit must be set for non overcommitable resources"))
        elif _quantity(value) != _quantity(limits[name]):
            problems.append(invalid(f"{path}.requests", str(value), f"must be equal to {name} limit of {limits[name]}"))
    return problems


def _quantity(value) -> float | None:
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value).strip())
    if not match or match[2] not in units and match[2]:
        return None
    return float(match[1]) * units.get(match[2], 1)


def _service(spec: dict) -> list[tuple[str, str]]:
    problems = []
    headless = spec.get("clusterIP") == "None"
    if not headless and spec.get("type") != "ExternalName" and not spec.get("ports"):
        problems.append(("spec.ports", "Required value"))
    names = [p.get("name") for p in spec.get("ports") or []]
    if len(names) > 1 and not all(names):
        problems += [(f"spec.ports[{i}].name", "Required value") for i, n in enumerate(names) if not n]
    for i, port in enumerate(spec.get("ports") or []):
        if port.get("name") and port["name"] in names[:i]:
            problems.append((f"spec.ports[{i}].name", f'Duplicate value: {_q(port["name"])}'))
    return problems


# ---- defaulting --------------------------------------------------------------------------
def apply_defaults(obj: dict) -> None:
    """The defaults (and generated fields) the server adds on create that our code reads back."""
    kind, meta = obj.get("kind"), obj["metadata"]
    if kind == "Job":
        spec = obj["spec"]
        if spec.get("completions") is None and spec.get("parallelism") is None:
            spec["completions"] = 1
        spec.setdefault("parallelism", 1)
        spec.setdefault("backoffLimit", 2147483647 if spec.get("backoffLimitPerIndex") is not None else 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
        template = spec["template"].setdefault("metadata", {})
        if not meta.get("labels") and template.get("labels"):
            meta["labels"] = dict(template["labels"])
        uid, name = meta["uid"], meta["name"]
        spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
        template.setdefault("labels", {}).update({
            "batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
            "controller-uid": uid, "job-name": name})
        obj["status"] = {}
    elif kind == "Service":
        spec = obj["spec"]
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if spec["type"] != "ExternalName":
            spec.setdefault("clusterIP", f"10.96.{int(meta['uid'][:2], 16)}.{int(meta['uid'][2:4], 16) or 1}")
            spec["clusterIPs"] = [spec["clusterIP"]]
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
        obj["status"] = {"loadBalancer": {}}
    elif kind == "Namespace":
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        obj["spec"] = {"finalizers": ["kubernetes"]}
        obj["status"] = {"phase": "Active"}
    elif kind == "Secret":
        obj.setdefault("type", "Opaque")
        for key, value in (obj.pop("stringData", None) or {}).items():  # write-only: merged into data
            obj.setdefault("data", {})[key] = base64.b64encode(value.encode()).decode()
    elif kind == "Deployment":
        obj["status"] = {}
