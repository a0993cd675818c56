"""A minimal `kustomize build` for machines without kubectl/kustomize: exactly the features
k8s/ uses (resources, namespace, labels, configMapGenerator with merge, generatorOptions
without hash suffixes). Anything else raises, so k8s/ cannot silently outgrow it; when
kubectl exists, a test checks both builds agree.
"""
from __future__ import annotations

from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "generatorOptions", "configMapGenerator"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass"}


def build(folder: Path) -> list[dict]:
    folder = Path(folder)
    kz = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kz) - SUPPORTED
    if unsupported:
        raise NotImplementedError(f"kustomize_lite does not support {sorted(unsupported)} in {folder}")
    docs: list[dict] = []
    for entry in kz.get("resources", []):
        path = folder / entry
        docs += build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    _generate(folder, kz, docs)
    for label in kz.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise NotImplementedError("labels on selectors/templates")
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    if "namespace" in kz:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kz["namespace"]
            for subject in doc.get("subjects", []) if doc["kind"] == "RoleBinding" else []:
                if subject.get("kind") == "ServiceAccount":
                    subject["namespace"] = kz["namespace"]
    return docs


def _generate(folder: Path, kz: dict, docs: list[dict]) -> None:
    gens = kz.get("configMapGenerator", [])
    if gens and not kz.get("generatorOptions", {}).get("disableNameSuffixHash") and any(
            g.get("behavior", "create") == "create" for g in gens):
        raise NotImplementedError("name suffix hashes")
    for gen in gens:
        data = {}
        for item in gen.get("files", []):
            key, _, file = item.rpartition("=")
            data[key or Path(file).name] = (folder / file).read_text()
        for item in gen.get("literals", []):
            key, _, value = item.partition("=")
            data[key] = value
        behavior = gen.get("behavior", "create")
        if behavior == "create":
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
            continue
        (target,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == gen["name"]]
        target["data"] = {**target.get("data", {}), **data} if behavior == "merge" else data
