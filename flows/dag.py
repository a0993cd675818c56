"""The stage graph, read from dvc.yaml: one pipeline definition for `dvc repro` and the flow."""
from __future__ import annotations

from graphlib import TopologicalSorter
from pathlib import Path

import yaml


def entries(items: list | None) -> list[str]:
    """Paths of a dvc.yaml list (deps, outs, params, metrics, plots): plain strings or `{path: options}`."""
    return [item if isinstance(item, str) else next(iter(item)) for item in items or []]


def stage_order(dvc_yaml: Path) -> list[str]:
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    produced_by = {}
    for name, stage in stages.items():
        for out in entries(stage.get("outs")):
            produced_by[out] = name
    graph = {
        name: {produced_by[dep] for dep in stage.get("deps", []) if dep in produced_by}
        for name, stage in stages.items()
    }
    return list(TopologicalSorter(graph).static_order())


def upstream_stages(dvc_yaml: Path) -> dict[str, list[str]]:
    """Stage -> the stages whose outputs (outs, metrics, plots) it depends on, in dvc.yaml order.
    A dep inside an output folder counts too (`models/pretrain/x` on `models/pretrain`)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    produced_by = {out: name for name, stage in stages.items()
                   for key in ("outs", "metrics", "plots") for out in entries(stage.get(key))}
    upstream = {}
    for name, stage in stages.items():
        found = {producer for dep in entries(stage.get("deps")) for out, producer in produced_by.items()
                 if producer != name and (dep == out or dep.startswith(out.rstrip("/") + "/"))}
        upstream[name] = [other for other in stages if other in found]
    return upstream
