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
