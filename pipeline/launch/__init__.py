"""Launchers move commands, not tensors: they run `python -m pipeline <stage>` somewhere.

`LocalLauncher` runs it as a subprocess on this machine; `KubernetesLauncher`
(pipeline/launch/kubernetes.py) as an indexed Job of GPU pods. Both stream every output
line to `log` while the stage runs and return its exit code.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class StageCommand:
    stage: str  # "pretrain"
    args: list[str] = field(default_factory=list)  # e.g. ["--set", "trainer.num_nodes=2"]
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the stage process(es)
    run_id: str = "local"  # Prefect flow run id: labels Kubernetes objects for cleanup


class Launcher(Protocol):
    def run(self, cmd: StageCommand, log: Callable[[str], None]) -> int: ...
