"""Stage keys for remote artifacts: what DVC's run-cache keys on (cmd, code deps, params, upstream outputs)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.dag import stage_order
from flows.stage_cache import plan
from pipeline.params import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workspace(tmp_path) -> Path:
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _keys(workspace: Path, *overrides: str) -> dict[str, str]:
    cfg = load_config(ROOT / "params.yaml", ["paths.root=s3://bucket/art", *overrides])
    return {name: p.key for name, p in plan(workspace, cfg, stage_order(workspace / "dvc.yaml")).items()}


def test_keys_are_stable_and_outputs_live_under_their_key(workspace):
    cfg = load_config(ROOT / "params.yaml", ["paths.root=s3://bucket/art"])
    plans = plan(workspace, cfg, stage_order(workspace / "dvc.yaml"))
    assert {n: p.key for n, p in plans.items()} == _keys(workspace)
    key = plans["evaluate"].key
    assert plans["evaluate"].outputs == {"release": f"s3://bucket/art/stages/evaluate/{key}/release",
                                         "reports": f"s3://bucket/art/stages/evaluate/{key}/reports"}
    assert plans["prepare"].overrides() == [f"paths.prepared=s3://bucket/art/stages/prepare/{plans['prepare'].key}/prepared"]


def test_a_finetune_param_changes_only_finetune_and_what_it_feeds(workspace):
    before, after = _keys(workspace), _keys(workspace, "finetune.epochs=7")
    assert [s for s in before if before[s] != after[s]] == ["finetune", "evaluate"]


def test_a_default_not_in_params_yaml_still_counts(workspace):
    # trainer.num_workers is spelled out in params.yaml, pretrain.schedule.min_lr_ratio's sibling keys are not all.
    before, after = _keys(workspace), _keys(workspace, "pretrain.model.heads=8")
    assert before["pretrain"] != after["pretrain"] and before["prepare"] == after["prepare"]


def test_changing_code_a_stage_depends_on_changes_its_key_and_downstream(workspace):
    before = _keys(workspace)
    with open(workspace / "pipeline" / "stages" / "finetune.py", "a") as handle:
        handle.write("\n# a change\n")
    after = _keys(workspace)
    assert [s for s in before if before[s] != after[s]] == ["finetune", "evaluate"]
