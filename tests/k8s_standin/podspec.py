"""A pod spec read as the kubelet reads it: the container's environment, user and volumes.

Pure functions over the pod object and lookups of its ConfigMaps and Secrets; the kubelet
(kubelet.py) turns their result into a container.
"""
from __future__ import annotations

import base64
import math
import os
import re
from pathlib import Path

import yaml

from tests.k8s_standin.image import ImageConfig
from tests.k8s_standin.rules import _quantity


class ConfigError(LookupError):
    """A missing ConfigMap/Secret or key: the container waits in CreateContainerConfigError."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, `$$` is a literal `$`,
    anything else (unknown names included) stays as written."""
    out, i = "", 0
    while i < len(text):
        if text.startswith("$$", i):
            out, i = out + "$", i + 2
            continue
        if text.startswith("$(", i) and text.find(")", i) > 0:
            end = text.find(")", i)
            name = text[i + 2:end]
            out, i = out + (env[name] if name in env else text[i:end + 1]), end + 1
            continue
        out, i = out + text[i], i + 1
    return out


def container_env(pod: dict, container: dict, configmap, secret) -> dict[str, str]:
    """The kubelet's makeEnvironmentVariables: envFrom sources in order, then `env` in order,
    each value expanded against what came before. configmap/secret(name) -> dict | None."""
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        what = "configmap" if "configMapRef" in source else "secret"
        ref = source.get("configMapRef") or source.get("secretRef") or {}
        data = (configmap if what == "configmap" else secret)(ref.get("name"))
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{what} "{ref.get("name")}" not found')
        env.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for item in container.get("env") or []:
        name, source = item["name"], item.get("valueFrom")
        if source is None:
            env[name] = expand(item.get("value", ""), env)
        elif "fieldRef" in source:
            env[name] = field_ref(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[name] = resource_field_ref(container, source["resourceFieldRef"])
        else:
            what = "ConfigMap" if "configMapKeyRef" in source else "Secret"
            ref = source.get("configMapKeyRef") or source["secretKeyRef"]
            data = (configmap if what == "ConfigMap" else secret)(ref.get("name"))
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{what.lower()} "{ref.get("name")}" not found' if data is None
                                  else f"couldn't find key {ref['key']} in {what} {ns}/{ref.get('name')}")
            env[name] = data[ref["key"]]
    return env


def field_ref(pod: dict, path: str) -> str:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta.get("uid"),
              "spec.nodeName": spec.get("nodeName", ""),
              "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
              "status.hostIP": status.get("hostIP", ""), "status.podIP": status.get("podIP", ""),
              "status.hostIPs": status.get("hostIP", ""), "status.podIPs": status.get("podIP", "")}
    if path in simple:
        return simple[path] or ""
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return (meta.get(match[1]) or {}).get(match[2], "")
    raise ConfigError(f"unsupported fieldPath: {path}")


def resource_field_ref(container: dict, ref: dict) -> str:
    kind, _, resource = ref["resource"].partition(".")
    value = _quantity(((container.get("resources") or {}).get(kind) or {}).get(resource, "0")) or 0
    return str(math.ceil(value / (_quantity(ref.get("divisor", "1")) or 1)))


def kubeconfig(server: str, namespace: str | None = None, user: str | None = None) -> str:
    """A kubeconfig for the stand-in: plain HTTP on loopback. `user` (e.g. the pod's
    `system:serviceaccount:<ns>:<name>`) is sent as the bearer token: not a credential, only a name
    the stand-in records with each request, so tests can check calls against that identity's Role."""
    context = {"cluster": "standin", "user": "standin", **({"namespace": namespace} if namespace else {})}
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "standin",
                           "clusters": [{"name": "standin", "cluster": {"server": server}}],
                           "users": [{"name": "standin", "user": {"token": user} if user else {}}],
                           "contexts": [{"name": "standin", "context": context}]})


def run_as(pod: dict, container: dict, image: ImageConfig, rootfs: str) -> tuple[int, int]:
    """(uid, gid): the container's securityContext over the pod's, else the image's USER (names
    looked up in the image's /etc/passwd and /etc/group). runAsNonRoot refuses uid 0, as the kubelet does."""
    pod_ctx, ctr_ctx = pod["spec"].get("securityContext") or {}, container.get("securityContext") or {}
    user, _, group = image.user.partition(":")
    uid = ctr_ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    gid = ctr_ctx.get("runAsGroup", pod_ctx.get("runAsGroup"))
    if uid is None:
        uid = _lookup(rootfs, "passwd", user) if user else 0
    if gid is None:
        gid = _lookup(rootfs, "group", group) if group else _primary_group(rootfs, uid)
    if ctr_ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) and uid == 0:
        raise ConfigError("container has runAsNonRoot and image will run as root")
    return int(uid), int(gid)


def _lookup(rootfs: str, table: str, name: str) -> int:
    if name.isdigit():
        return int(name)
    for line in Path(rootfs, "etc", table).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise ConfigError(f"unable to find {'user' if table == 'passwd' else 'group'} {name}: no matching entries")


def _primary_group(rootfs: str, uid: int) -> int:
    for line in Path(rootfs, "etc", "passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 3 and fields[2] == str(uid):
            return int(fields[3])
    return 0


def volume_mounts(pod: dict, container: dict, pod_dir: Path, configmap, secret) -> list[tuple[str, str, bool]]:
    """(host source, container path, read-only) per volumeMount. emptyDir: a per-pod folder, mode 0777
    as the kubelet makes it; configMap/secret: their keys as files. Other volume types (hostPath, PVCs)
    are refused: the pipeline's pods use none, and Pod Security "restricted" forbids hostPath."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    mounts = []
    for vm in container.get("volumeMounts") or []:
        volume = volumes.get(vm["name"])
        if volume is None:
            raise ConfigError(f'volume "{vm["name"]}" not found in the pod spec')
        source = pod_dir / "volumes" / vm["name"]
        if "emptyDir" in volume:
            source.mkdir(parents=True, exist_ok=True)
            os.chmod(source, 0o777)
        elif "configMap" in volume or "secret" in volume:
            ref = volume.get("configMap") or volume["secret"]
            name = ref.get("name") or ref.get("secretName")
            data = (configmap if "configMap" in volume else secret)(name)
            if data is None:
                if ref.get("optional"):
                    data = {}
                else:
                    raise ConfigError(f'{"configmap" if "configMap" in volume else "secret"} "{name}" not found')
            source.mkdir(parents=True, exist_ok=True)
            for key, value in data.items():
                (source / key).write_text(value)
                os.chmod(source / key, 0o644)
        else:
            raise ConfigError(f'volume "{vm["name"]}": the stand-in supports emptyDir, configMap and secret volumes')
        target = vm["mountPath"] + (f"/{vm['subPath']}" if vm.get("subPath") else "")
        mounts.append((str(source / vm["subPath"]) if vm.get("subPath") else str(source), target,
                       bool(vm.get("readOnly"))))
    return mounts


def secret_data(obj: dict | None) -> dict | None:
    if obj is None:
        return None
    return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (obj.get("data") or {}).items()}
