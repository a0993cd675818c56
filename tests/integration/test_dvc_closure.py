"""A cache that cannot lie, with real DVC: appending a line to any module a stage imports marks that stage
(and only the stages that import it) changed in `dvc status`; so does a config key that params.yaml once
left to its default. The imports tests/stage_closure.py reads from the source are checked against the
modules each stage's process really imported during the `dvc repro` (lazy imports included).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.stages import STAGES
from tests.conftest import dvc_env
from tests.integration.test_dvc import DVC, RAN, _copy_project
from tests.stage_closure import config_reads, key_covered, stage_closure, stage_code

# On PYTHONPATH during the repro: each stage's process writes, at exit, the repo files it imported.
RECORD_IMPORTS = '''
import atexit, os, sys

def _record():
    stage, root, out = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT"), os.environ.get("IMPORTS_OUT")
    if not (stage and root and out):
        return  # DVC itself, or not under the test
    root = os.path.realpath(root)
    files = {os.path.relpath(os.path.realpath(f), root) for m in list(sys.modules.values())
             if isinstance(f := getattr(m, "__file__", None), str) and os.path.isabs(f)
             and os.path.realpath(f).startswith(root + os.sep)}
    with open(os.path.join(out, stage + ".txt"), "a") as handle:
        handle.write("".join(f + "\\n" for f in sorted(files)))

atexit.register(_record)
'''


def _env(**extra: str) -> dict[str, str]:
    return dvc_env(**extra)  # PYTHONPATH, when given: only the import recorder


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done


def _changed(project: Path) -> set[str]:
    """Stages `dvc status` reports changed."""
    return set(json.loads(_run([DVC, "status", "--json"], project).stdout or "{}"))


def _changed_in_process(project: Path) -> set[str]:
    """The same, through DVC's API: a third of the CLI's start-up, for the loop over every module."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return {name.rpartition(":")[2] for name in repo.status()}  # `<path>/dvc.yaml:<stage>` outside cwd


def _appended(path: Path):
    original = path.read_bytes()
    path.write_bytes(original + b"\n# appended: a code change is a dependency change\n")
    return original


@pytest.mark.slow
def test_dvc_status_marks_exactly_the_stages_that_import_a_changed_module(tmp_path):
    project, hook, imported = tmp_path / "project", tmp_path / "hook", tmp_path / "imported"
    for folder in (project, hook, imported):
        folder.mkdir()
    (hook / "sitecustomize.py").write_text(RECORD_IMPORTS)
    _copy_project(project)
    _run(["git", "init", "-q"], project)
    _run([DVC, "init", "-q"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-q", "-m", "tiny project"], project)

    done = _run([DVC, "repro"], project, PYTHONPATH=str(hook), IMPORTS_OUT=str(imported))
    assert RAN.findall(done.stdout) == list(STAGES), done.stdout
    closures = {stage: stage_closure(stage, project) for stage in STAGES}

    # What each stage's process imported, measured, is within the closure read from the source.
    for stage in STAGES:
        measured = set((imported / f"{stage}.txt").read_text().split())
        assert f"pipeline/stages/{stage}.py" in measured
        assert measured - closures[stage] == set(), f"stage {stage!r} imported modules the closure misses"
    assert _changed(project) == set()

    # With the `dvc status` command: the shard stream (read by the training and evaluation stages, not by the
    # data stages, which import no training code) and the glyph renderer (prepare's and corpus's sources).
    for module, expected in (("pipeline/data/stream.py", {"pretrain", "finetune", "evaluate"}),
                             ("pipeline/data/glyphs.py", {"prepare", "corpus"})):
        assert {stage for stage in STAGES if module in closures[stage]} == expected
        original = _appended(project / module)
        assert _changed(project) == expected, module
        (project / module).write_bytes(original)

    # And for every module of every closure, one at a time: exactly the stages that import it.
    for module in sorted(set().union(*closures.values())):
        original = _appended(project / module)
        expected = {stage for stage in STAGES if module in closures[stage]}
        assert _changed_in_process(project) == expected, module
        (project / module).write_bytes(original)
    assert _changed(project) == set()

    # Config keys params.yaml used to leave to config.py's defaults now reach DVC: each re-runs every stage
    # that reads it, and not the stages named (the expensive pretraining above all).
    params = project / "params.yaml"
    original = params.read_text()
    for key, value, unchanged in (("pretrain.model.heads", 8, {"prepare", "corpus", "finetune"}),
                                  ("data.num_workers", 1, {"pretrain"}),
                                  ("finetune.optimizer.momentum", 0.8, {"prepare", "corpus", "pretrain"})):
        raw = yaml.safe_load(original)
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node[section]
        node[leaf] = value
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        readers = {stage for stage in STAGES for module in stage_code(stage, project)
                   for read in config_reads(module, project) if read == "" or key_covered(key, [read])}
        changed = _changed_in_process(project)
        assert readers and readers <= changed and not unchanged & changed, (key, readers, changed)
        params.write_text(original)
    assert _changed(project) == set()
