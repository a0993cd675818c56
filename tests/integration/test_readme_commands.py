"""The README's shell examples run, so a false command fails CI.

Every line of the README's ```bash / ```sh / ```shell blocks is a command (a trailing `# comment`
dropped). Each runs with bash, in README order, in a temporary git + DVC copy of this project on the
TINY params (tests/conftest.py), and must exit 0, except the few in SKIP, each with its reason.
A command the README gains is run by default: skipping one means adding it to SKIP here.
The files the examples name as placeholders (photo.jpg, images/, an archived run) are made first.

Besides exit codes it checks what the README claims of `dvc repro`: the first call runs every stage,
a second runs nothing, a clean first run prints no "Checkpoint directory ... exists and is not empty"
warning, git's index is left alone (no autostage), `dvc exp run --set-param finetune.epochs=...` and
an edit of params.yaml followed by `dvc repro` re-run finetune and evaluate only.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.params import update_params_file
from pipeline.stages import STAGES
from tests.conftest import PYTHON, REPO_ROOT, dvc_env, write_png
from tests.integration.test_dvc import _copy_project

pytestmark = pytest.mark.slow

README = REPO_ROOT / "README.md"
DVC = str(Path(PYTHON).parent / "dvc")
RAN = re.compile(r"Running stage '([^']+)'")
SHELLS = {"bash", "sh", "shell"}
ARCHIVED_RUN = "20261130-095125-silky-fossa"  # the run name the README's predict example uses

# command -> why it cannot run here. Keep it short: everything else runs.
SKIP = {
    "make run": "the whole pipeline on the default (not tiny) params, after installing .venv: a minute or more; "
                "its flow is tests/integration/test_flow_cli.py's, on tiny params",
    "make test": "this test suite itself, plus the image build",
    "make ui": "a long-running server; its port handling is tests/integration/test_ui_port.py, "
               "its deployments tests/integration/test_flow_ui.py",
    "PIPELINE_UI_PORT=4300 make ui": "a long-running server (as `make ui`)",
    "dvc plots show --open": "opens a browser",
}


def readme_commands(text: str) -> list[str]:
    """Each command line of the shell code blocks, trailing comment removed, in order."""
    commands, language = [], None
    for line in text.splitlines():
        fence = re.match(r"^```(\S*)", line.strip())
        if fence:
            language = None if language is not None else fence.group(1) or ""
            continue
        if language in SHELLS:
            command = re.sub(r"(^|\s+)#(\s.*)?$", "", line).strip()
            if command:
                commands.append(command)
    return commands


def test_readme_commands_are_found_and_skips_are_listed():
    commands = readme_commands(README.read_text())
    assert "dvc repro" in commands and any(c.startswith("dvc exp run --set-param") for c in commands)
    assert not [c for c in commands if c.startswith("dvc repro") and "--set-param" in c], \
        "`dvc repro` has no --set-param (that is `dvc exp run`)"
    assert set(SKIP) <= set(commands), f"SKIP names commands the README no longer has: {set(SKIP) - set(commands)}"


def _env() -> dict[str, str]:
    return dvc_env()  # stages import the copy's `pipeline`, which `python -m` finds in cwd


def _sh(command: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"README command `{command}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def _placeholders(project: Path) -> None:
    """What the predict examples name: photo.jpg, an images/ folder, a champion and an archived run."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("images/3/0117.png", "images/8/0412.png"):
        write_png(project / name, rng.integers(0, 255, (8, 8), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(project / "photo.jpg")
    archived = project / "registry" / "releases" / ARCHIVED_RUN
    shutil.copytree(project / "models" / "release", archived)
    (project / "registry" / "champion.json").write_text(json.dumps({"run": ARCHIVED_RUN, "release": str(archived)}))


def test_readme_shell_commands_run(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    _copy_project(project)
    shutil.copy2(README, project / "README.md")
    _sh("git init -q && dvc init -q", project)
    shutil.copy2(REPO_ROOT / ".dvc" / "config", project / ".dvc" / "config")  # the project's DVC settings
    _sh("git add -A && git commit -q -m 'tiny project'", project)

    ran, skipped, repros = [], [], 0
    for command in readme_commands(README.read_text()):
        if command in SKIP:
            skipped.append(command)
            continue
        if command.startswith("pipeline predict") and not (project / "registry").exists():
            _placeholders(project)
        done = _sh(command, project)
        ran.append(command)
        output = done.stdout + done.stderr
        stages = RAN.findall(done.stdout)
        if command == "dvc repro":
            repros += 1
            assert stages == list(STAGES), output
            assert "exists and is not empty" not in output, "a clean first run warns:\n" + output
            staged = _sh("git diff --cached --name-only", project).stdout.split()
            assert staged == [], f"`dvc repro` staged files in git (autostage): {staged}"
            assert _sh("dvc repro", project).stdout.count("Running stage") == 0  # "a second call runs nothing"
            # The README's advice: commit dvc.lock yourself (also gives `dvc plots diff HEAD~1` a HEAD~1).
            _sh("git add -A && git commit -q -m 'dvc repro'", project)
        elif command.startswith("dvc exp run --set-param finetune.epochs="):
            assert stages == ["finetune", "evaluate"], output
        elif command.startswith("dvc plots show"):
            assert (project / "dvc_plots" / "index.html").is_file()
        elif command == "python -m pipeline.curves":
            assert {p.name for p in (project / "dvc_plots").glob("*.png")} == {"curves.png", "confusion.png"}
        elif command.startswith("pipeline predict"):
            assert done.stdout.strip(), output  # a line per image (or --out's file)
    assert repros == 1 and "dvc repro" in ran
    assert sorted(skipped) == sorted(SKIP)

    # "or edit params.yaml": a changed param under plain `dvc repro` re-runs finetune and evaluate only.
    update_params_file(project / "params.yaml", ["finetune.epochs=3"])
    stages = RAN.findall(_sh("dvc repro", project).stdout)
    assert stages == ["finetune", "evaluate"]
