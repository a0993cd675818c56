"""dvc.yaml wiring with real DVC: full repro, a no-op second repro, and selective re-runs."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.params import apply_overrides, build_config, update_params_file
from pipeline.stages import STAGES
from tests.conftest import PYTHON, REPO_ROOT, TINY, dvc_env

DVC = str(Path(PYTHON).parent / "dvc")
RAN = re.compile(r"Running stage '([^']+)'")


def _copy_project(dest: Path) -> None:
    """This working tree's pipeline code (committed or not) plus dvc.yaml and a tiny params.yaml."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "pipeline"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in [*listed, "dvc.yaml", ".dvcignore"]:
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    raw = apply_overrides(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), list(TINY))
    build_config(raw)  # still valid
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dvc_env()  # stages must import the copy's `pipeline`, which `python -m` finds in cwd
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done


def _repro(cwd: Path) -> tuple[list[str], str]:
    done = _run([DVC, "repro"], cwd)
    return RAN.findall(done.stdout), done.stdout


@pytest.mark.slow
def test_dvc_repro_runs_each_stage_once_and_only_what_changed(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    _copy_project(project)
    _run(["git", "init", "-q"], project)
    _run([DVC, "init", "-q"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-q", "-m", "tiny project"], project)

    ran, out = _repro(project)
    assert ran == list(STAGES), out
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert {"test", "scratch", "transfer_gain"} <= set(metrics)
    assert (project / "dvc.lock").exists()
    report = json.loads((project / "reports" / "usage" / "evaluate.json").read_text())  # the run report
    assert report["git_commit"] and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", report["git_commit"])
    shown = json.loads(_run([DVC, "metrics", "show", "--json"], project).stdout)
    assert json.dumps(shown).count('"accuracy"') >= 2  # DVC reads test.accuracy and scratch.test.accuracy

    outputs = [project / p for p in ("data/prepared/manifest.json", "models/pretrain/backbone.safetensors",
                                     "models/finetune/finetuned.safetensors", "reports/metrics.json")]
    stamps = [p.stat().st_mtime_ns for p in outputs]
    ran, out = _repro(project)
    assert ran == [], out
    assert all(f"Stage '{stage}' didn't change" in out for stage in STAGES), out
    assert [p.stat().st_mtime_ns for p in outputs] == stamps
    assert "up to date" in _run([DVC, "status"], project).stdout

    steps_before = json.loads((project / "models" / "finetune" / "summary.json").read_text())["finetuned"]["steps"]
    update_params_file(project / "params.yaml", ["finetune.epochs=3"])
    ran, out = _repro(project)
    assert ran == ["finetune", "evaluate"], out
    assert [p.stat().st_mtime_ns for p in outputs[:2]] == stamps[:2]  # prepare's and pretrain's outputs kept
    summary = json.loads((project / "models" / "finetune" / "summary.json").read_text())
    assert summary["finetuned"]["steps"] == steps_before * 3 // 2  # the new param took effect (2 -> 3 epochs)

    evaluate_code = project / "pipeline" / "stages" / "evaluate.py"
    evaluate_code.write_text(evaluate_code.read_text() + "\n# a code change is a dependency change\n")
    ran, out = _repro(project)
    assert ran == ["evaluate"], out

    # New target data re-runs what the target feeds, never the corpus or pretraining (they have their own key).
    corpus_and_backbone = [project / "data/corpus/manifest.json", outputs[1]]
    kept = [p.stat().st_mtime_ns for p in corpus_and_backbone]
    update_params_file(project / "params.yaml", ["data.test_fraction=0.3"])
    ran, out = _repro(project)
    assert ran == ["prepare", "finetune", "evaluate"], out
    assert "Stage 'corpus' didn't change" in out and "Stage 'pretrain' didn't change" in out
    assert [p.stat().st_mtime_ns for p in corpus_and_backbone] == kept
