"""PATCH bodies: JSON merge patch (RFC 7386) and an approximation of strategic merge patch.

Strategic merge patch is what `kubectl apply` sends for built-in kinds on a second apply.
The real server takes each list's merge key from the Go types; here the few lists that
matter are keyed by name (containers by `name`, volumeMounts by `mountPath`...) and every
other list is replaced. `$setElementOrder` and `$retainKeys` directives are ignored.
"""
from __future__ import annotations

MERGE_KEYS = {"containers": ("name",), "initContainers": ("name",), "env": ("name",), "volumes": ("name",),
              "volumeMounts": ("mountPath",), "imagePullSecrets": ("name",), "ownerReferences": ("uid",),
              "conditions": ("type",), "ports": ("containerPort", "port"), "envFrom": ()}


def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strategic_merge_patch(target, patch):
    if not isinstance(patch, dict):
        return patch
    if patch.get("$patch") == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue  # directives ($setElementOrder/..., $retainKeys, $deleteFromPrimitiveList/...)
        if value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            out.pop(key, None)
        elif isinstance(value, list) and MERGE_KEYS.get(key) and isinstance(out.get(key), list):
            out[key] = _merge_list(out[key], value, MERGE_KEYS[key])
        else:
            out[key] = strategic_merge_patch(out.get(key), value) if isinstance(value, dict) else value
    return out


def _merge_list(current: list, patch: list, keys: tuple) -> list:
    if not all(isinstance(item, dict) for item in current + patch):
        return patch

    def key_of(item: dict):
        return next(((k, item[k]) for k in keys if k in item), None)

    result = list(current)
    for item in patch:
        position = next((i for i, old in enumerate(result) if key_of(old) == key_of(item)), None)
        if item.get("$patch") == "delete":
            if position is not None:
                result.pop(position)
        elif position is None:
            result.append(strategic_merge_patch({}, item))
        else:
            result[position] = strategic_merge_patch(result[position], item)
    return result
