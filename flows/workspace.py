"""Per-run DVC workspaces and the shared, content-addressed cache.

Each flow run works in its own folder (`runs/<name>/`): a copy of dvc.yaml, the stage
code and its effective params.yaml. Two runs never write each other's outputs. All
workspaces share one DVC cache and one DVC remote, whose run-cache maps (code, data,
params) -> outputs. So a stage that already ran, under any flow run or under
`dvc repro` in any clone that pushed (`dvc push --run-cache`), is restored, not re-run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dvc.repo import Repo

PROJECT_FILES = ("dvc.yaml", ".dvcignore")
CODE_DIRS = ("pipeline",)
# Stages run concurrently in the flow's threads, but a DVC repo is opened with the workspace as the process's
# cwd (dvc_repo) and writes one dvc.lock: every DVC operation of the process takes this lock; the stages'
# own processes (or pods) run outside it.
_DVC_LOCK = threading.RLock()


@dataclass
class Workspace:
    root: Path
    project: Path

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"


def create_workspace(project: Path, root: Path, dvc_remote: str = "") -> Workspace:
    """Lay out the run's folder: dvc.yaml, the stage code and a DVC repo sharing the project's cache. Its
    params.yaml is written by the flow, once, when the run's config is whole (versions and cache pins)."""
    root.mkdir(parents=True, exist_ok=False)
    for name in PROJECT_FILES:
        if (project / name).exists():
            shutil.copy2(project / name, root / name)
    for name in CODE_DIRS:
        shutil.copytree(project / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _init_dvc(project, root, dvc_remote)
    return Workspace(root=root, project=project)


def _init_dvc(project: Path, root: Path, remote: str) -> None:
    """`remote` (paths.dvc_remote, e.g. s3://bucket/dvc): the shared remote; empty: the project's own."""
    from dvc.repo import Repo

    from configobj import ConfigObj

    Repo.init(str(root), no_scm=True)
    source = project / ".dvc"
    config = ConfigObj(str(source / "config")) if (source / "config").exists() else ConfigObj()
    config.filename = str(root / ".dvc" / "config")
    config.setdefault("core", {})["no_scm"] = "true"  # runs/ lives inside the project's git checkout
    # Share the project's cache: objects are stored once, and run-cache entries are seen at once.
    config.setdefault("cache", {})["dir"] = str((source / "cache").resolve())
    if remote:
        config["core"]["remote"] = "shared"
        config['remote "shared"'] = {"url": remote}
    config.write()
    if not remote and (source / "config.local").exists():
        shutil.copy2(source / "config.local", root / ".dvc" / "config.local")


def has_remote(ws: Workspace) -> bool:
    with dvc_repo(ws) as repo:
        return bool(repo.config.get("core", {}).get("remote"))


def pull_run_cache(ws: Workspace) -> None:
    """Fetch run-cache entries from the remote (what `dvc repro --pull` does first)."""
    if has_remote(ws):
        with dvc_repo(ws) as repo:
            repo.stage_cache.pull(None)


def restore_stage(ws: Workspace, stage_name: str) -> str:
    """-> "up-to-date" | "run-cache" | "miss". On a run-cache hit, outputs are checked out and locked."""
    from dvc.stage.cache import RunCacheNotFoundError

    pull = has_remote(ws)
    with dvc_repo(ws) as repo:
        with repo.lock:
            stage = repo.stage.collect(stage_name)[0]
            if not stage.changed():
                return "up-to-date"
            try:
                repo.stage_cache.restore(stage, pull=pull)
            except RunCacheNotFoundError:
                return "miss"
        repo.commit(stage_name, force=True)  # takes the lock itself
        return "run-cache"


def commit_stage(ws: Workspace, stage_name: str) -> None:
    """After the launcher ran the stage: hash outputs into the cache, write dvc.lock, record the run-cache."""
    with dvc_repo(ws) as repo:
        repo.commit(stage_name, force=True)


@contextlib.contextmanager
def dvc_repo(ws: Workspace) -> Iterator["Repo"]:
    """Open the workspace's DVC repo with it as cwd: DVC resolves stage paths against the cwd."""
    from dvc.repo import Repo

    with _DVC_LOCK:
        previous = os.getcwd()
        os.chdir(ws.root)
        try:
            with Repo(str(ws.root)) as repo:
                yield repo
        finally:
            os.chdir(previous)


def push(ws: Workspace, targets: list[str] | None = None) -> bool:
    """Push outputs and run-cache entries (or only `targets`) to the shared remote (no-op without a remote)."""
    if not has_remote(ws):
        return False
    with dvc_repo(ws) as repo:
        repo.push(targets=targets, run_cache=targets is None)
    return True
