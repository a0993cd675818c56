"""The whole pipeline against a local S3 (moto on 127.0.0.1): source, artifacts, checkpoints
(with a SIGTERM and a resume), registry and the DVC remote with its shared run-cache."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import storage
from pipeline.params import apply_overrides, build_config, load_config
from pipeline.stages import STAGES, stage_runner
from tests.conftest import PARAMS, PYTHON, REPO_ROOT, TINY, sets, sigterm_at_step, step_numbers, subprocess_env
from tests.prefect_fixtures import set_paths

pytest_plugins = ["tests.s3_fixtures"]

# Long enough that SIGTERM lands mid-pretraining; checkpoints every 5 steps go to S3.
RESUMABLE = [*TINY, "pretrain.glyphs_per_class=60", "pretrain.batch_size=16", "pretrain.epochs=3",
             "pretrain.checkpoint_every_n_steps=5"]


@pytest.mark.slow
def test_stages_on_s3_source_artifacts_checkpoints_and_resume(s3, tmp_path, capsys):
    source = s3.upload_image_folder(tmp_path / "images", "source/digits", classes=3, per_class=12)
    root = s3.uri("run")
    overrides = [*RESUMABLE, f"data.source={source}", f"paths.root={root}"]
    cfg = load_config(PARAMS, overrides)

    stage_runner("prepare")(cfg)
    first = capsys.readouterr().out
    assert "36 downloaded, 0 from the local cache" in first
    from pipeline.data.sources import scan_source

    scan_source(source, "data", cfg)  # a re-run reads the local cache: only the listing goes to S3
    assert "0 downloaded, 36 from the local cache" in capsys.readouterr().out
    stage_runner("corpus")(cfg)  # the pretraining corpus (builtin glyphs), written to S3 too

    code, interrupted, _ = sigterm_at_step([PYTHON, "-m", "pipeline", "pretrain", "--params", str(PARAMS),
                                            *sets(overrides)], tmp_path, min_step=7)
    assert code == 143, interrupted
    saved = re.search(r"\[checkpoint\] SIGTERM at step (\d+): saved (s3://\S+/last\.ckpt)", interrupted)
    assert saved, interrupted
    stopped_at, checkpoint = int(saved.group(1)), saved.group(2)
    assert storage.exists(checkpoint)
    assert not storage.exists(storage.join(root, "models", "pretrain", "_COMPLETE"))

    resumed = subprocess.run([PYTHON, "-m", "pipeline", "pretrain", "--params", str(PARAMS), *sets(overrides)],
                             cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {checkpoint} at step {stopped_at}" in resumed.stdout
    steps = step_numbers(resumed.stdout)
    summary = storage.read_json(storage.join(root, "models", "pretrain", "summary.json"))
    usage = storage.read_json(storage.join(root, "reports", "usage", "pretrain.json"))  # the run report
    assert steps[0] == stopped_at + 1 and steps[-1] == summary["steps"] and usage["resumed_from_step"] == stopped_at

    stage_runner("finetune")(cfg)
    stage_runner("evaluate")(cfg)
    logs = capsys.readouterr()

    keys = s3.keys("run/")
    for output in ("data/prepared", "data/corpus", "models/pretrain", "models/finetune", "models/release"):
        assert f"run/{output}/_COMPLETE" in keys
    assert {"run/reports/metrics.json", "run/models/release/model_card.json"} <= set(keys)
    assert not [k for k in keys if ".staging-" in k]  # every upload-aside prefix was cleaned up
    metrics = storage.read_json(storage.join(root, "reports", "metrics.json"))
    assert {"test", "scratch", "transfer_gain"} <= set(metrics)
    card = storage.read_json(storage.join(root, "models", "release", "model_card.json"))
    assert card["data_source"] == source and "paths" not in card["params"]  # where a run writes: not lineage
    # The secret key is in this process's environment and the stages' and never anywhere else.
    s3.assert_no_secret(first, interrupted, resumed.stdout, resumed.stderr, logs.out, logs.err,
                        *(storage.read_bytes(s3.uri(k)).decode("latin-1") for k in keys))


def _project(dest: Path, overrides: list[str]) -> Path:
    """A fresh clone-like project: its own params.yaml and its own (empty) local DVC cache."""
    dest.mkdir()
    shutil.copytree(REPO_ROOT / "pipeline", dest / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        if (REPO_ROOT / name).exists():
            shutil.copy2(REPO_ROOT / name, dest / name)
    raw = apply_overrides(yaml.safe_load(PARAMS.read_text()), overrides)
    build_config(raw)
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def _flow(project: Path, tmp: Path, s3) -> tuple[dict, str]:
    set_paths(project, registry=s3.uri("registry"), dvc_remote=s3.uri("dvc"))
    env = subprocess_env(PIPELINE_PROJECT=str(project), PREFECT_HOME=str(tmp / "prefect"),
                         DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                         PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([PYTHON, "-m", "pipeline", "run"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs
    outcomes = dict(re.findall(r"(prepare|corpus|pretrain|finetune|evaluate): (ran|restored from the run-cache)", logs))
    return outcomes, logs


@pytest.mark.slow
def test_flow_shares_run_cache_through_s3_dvc_remote(s3, tmp_path):
    """Two clones (separate local DVC caches) share one S3 remote: the second restores the training stages."""
    source = s3.upload_image_folder(tmp_path / "images", "source/digits", classes=3, per_class=12)
    overrides = [*TINY, f"data.source={source}"]

    first, logs_first = _flow(_project(tmp_path / "clone-a", overrides), tmp_path, s3)
    assert set(first.values()) == {"ran"} and len(first) == len(STAGES), logs_first
    pushed = s3.keys("dvc/")
    assert any(k.startswith("dvc/runs/") for k in pushed), pushed  # the run-cache lives on S3
    assert any(k.startswith("dvc/files/md5/") for k in pushed)

    second, logs_second = _flow(_project(tmp_path / "clone-b", overrides), tmp_path, s3)
    restored = {stage for stage, outcome in second.items() if outcome == "restored from the run-cache"}
    assert restored == {"prepare", "corpus", "pretrain", "finetune", "evaluate"}, logs_second
    metrics = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("clone-*/runs/*/reports/metrics.json"))
               if not p.parents[1].is_symlink()]  # runs/latest points at the same run
    assert len(metrics) == 2 and metrics[0]["test"] == metrics[1]["test"]

    champion = storage.read_json(s3.uri("registry", "champion.json"))
    assert champion["release"].startswith(s3.uri("registry", "releases"))
    storage.require_complete(champion["release"], produced_by="evaluate")
    s3.assert_no_secret(logs_first, logs_second, *(p.read_text() for p in tmp_path.glob("clone-*/runs/*/.dvc/config")))


def test_shards_stream_from_s3_read_ahead_in_threads_as_from_disk(s3, tmp_path):
    """Each rank's shards come from S3 one GET per shard, read ahead in threads; batches equal the local ones."""
    import numpy as np

    from pipeline.data.shards import Sample, SplitShards, write_split
    from pipeline.data.stream import ShardStream

    entries = write_split(tmp_path, "train", (Sample(f"{i:08d}", np.full((4, 4, 3), i, np.uint8), i % 5)
                                              for i in range(60)), 7)
    for entry in entries:
        storage.write_bytes(s3.uri("prepared", entry["name"]), (tmp_path / entry["name"]).read_bytes())
    counts = tuple(e["samples"] for e in entries)

    def batches(root, rank):
        split = SplitShards(tuple(storage.join(root, e["name"]) for e in entries), counts, (3, 4, 4))
        stream = ShardStream(split, 8, seed=3, shuffle=True, readahead=3, cache_bytes=0, rank_world=(rank, 2))
        return [(images.clone(), labels.clone()) for images, labels in stream]

    for rank in (0, 1):
        remote, local = batches(s3.uri("prepared"), rank), batches(str(tmp_path), rank)
        assert len(remote) == len(local) == 4
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(remote, local))
