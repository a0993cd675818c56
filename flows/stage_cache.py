"""The stage cache for artifacts on remote storage (`paths.root` on s3://), where DVC cannot cache.

DVC 3 dropped external outputs, so with artifacts on S3 (which Kubernetes needs) its run-cache
cannot restore a stage. This keeps the same promise with the same inputs. A stage's key is
what DVC's run-cache keys it on, read from the same dvc.yaml: its `cmd`, the content of its
code deps, the values of its `params:` keys and, for deps that are other stages' outputs, the
keys of those stages (which stand for their content). Params are taken from the *effective*
config, defaults included, so a default that params.yaml does not spell out still counts.

Each output is written under `<root>/stages/<stage>/<key>/<path>` and never rewritten, so a key
names one content: a hit is that output's completion marker, and restoring is pointing the next
stages at it (by reference: nothing is copied). Unchanged stages are therefore never launched,
and a weekly retrain with new target data re-runs only what that data feeds.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flows.dag import entries
from pipeline import storage
from pipeline.config import Config

KEY_LENGTH = 16


@dataclass
class StagePlan:
    stage: str
    key: str
    outputs: dict[str, str] = field(default_factory=dict)  # paths field -> keyed URI

    def overrides(self) -> list[str]:
        return [f"paths.{name}={uri}" for name, uri in self.outputs.items()]

    def complete(self) -> bool:
        """Every output of this key exists in full (evaluate's reports: metrics.json is written last)."""
        return all(storage.exists(storage.join(uri, "metrics.json" if name == "reports" else storage.COMPLETE_MARKER))
                   for name, uri in self.outputs.items())


def _paths_field(out: str, cfg: Config) -> str:
    """Which `paths.*` setting a dvc.yaml output is (data/prepared -> prepared, reports/x.json -> reports)."""
    defaults = type(cfg.paths)()
    for name in type(cfg.paths).model_fields:
        value = getattr(defaults, name)
        if name not in cfg.paths.UNROOTED and name != "root" and (out == value or out.startswith(value + "/")):
            return name
    raise ValueError(f"dvc.yaml output {out!r} matches no paths.* setting")


def _code_digest(root: Path, dep: str) -> str:
    """Content of a file, or of every file under a folder (bytecode caches excluded), as DVC hashes deps."""
    path, digest = root / dep, hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
        if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _param(dumped: dict, dotted: str):
    node = dumped
    for part in dotted.split("."):
        node = node[part]
    return node


def plan(workspace: Path, cfg: Config, order: list[str]) -> dict[str, StagePlan]:
    """Keys and keyed output locations of every stage, in dvc.yaml order (upstream keys first)."""
    stages = yaml.safe_load((workspace / "dvc.yaml").read_text())["stages"]
    dumped = cfg.model_dump(mode="json")
    produced: dict[str, str] = {}  # dvc.yaml output path -> key of the stage that writes it
    plans: dict[str, StagePlan] = {}
    for name in order:
        stage = stages[name]
        deps = {}
        for dep in entries(stage.get("deps")):
            deps[dep] = produced[dep] if dep in produced else _code_digest(workspace, dep)
        payload = {"cmd": stage["cmd"], "deps": deps,
                   "params": {p: _param(dumped, p) for p in entries(stage.get("params"))}}
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:KEY_LENGTH]
        outs = entries(stage.get("outs")) + entries(stage.get("metrics")) + entries(stage.get("plots"))
        fields = dict.fromkeys(_paths_field(out, cfg) for out in outs)
        plans[name] = StagePlan(name, key, {f: storage.join(cfg.paths.root, "stages", name, key, f) for f in fields})
        for out in outs:
            produced[out] = key
    return plans
