"""Pretrain as 2-process DDP (num_nodes=2, CPU, gloo) with the environment a Kubernetes indexed Job sets per pod."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from pipeline.params import load_config
from pipeline.stages import stage_runner
from tests.conftest import PYTHON, TINY, free_port, sets, subprocess_env

DDP = [*TINY, "pretrain.glyphs_per_class=40", "pretrain.epochs=3", "pretrain.batch_size=16",
       "pretrain.model.width=16", "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp",
       "trainer.accelerator=cpu", "trainer.log_every_n_steps=2"]


@pytest.mark.slow
def test_two_node_ddp_pretrain(workdir):
    stage_runner("corpus")(load_config(workdir / "params.yaml", [*DDP, f"paths.root={workdir}"]))
    cfg = load_config(workdir / "params.yaml", DDP)
    train_images = 10 * cfg.pretrain.glyphs_per_class * 9 // 10
    expected_steps = cfg.pretrain.epochs * cfg.pretrain.steps_per_epoch(train_images, 2)
    port = str(free_port())
    ranks = []
    for node_rank in (0, 1):
        env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node_rank),
                             PIPELINE_RENDEZVOUS_TIMEOUT_S="120")
        for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "GLOBAL_RANK"):
            env.pop(var, None)
        ranks.append(subprocess.Popen([PYTHON, "-m", "pipeline", "pretrain", *sets(DDP)], cwd=workdir, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in ranks:
            out, err = proc.communicate(timeout=300)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
    for node_rank, (code, out, err) in enumerate(outputs):
        assert code == 0, f"node {node_rank}:\n{out}\n{err}"
        start = re.search(r"\[pretrain\] world_size=(\d+) global_rank=(\d+) node_rank=(\d+)", out)
        assert start, out
        assert start.groups() == ("2", str(node_rank), str(node_rank))
    rank0_out = outputs[0][1]
    assert f"step {expected_steps}/{expected_steps}" in rank0_out
    assert "done:" not in outputs[1][1]  # rank 1 trains but never publishes

    summary = json.loads((workdir / "models" / "pretrain" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == expected_steps
    assert summary["global_batch"] == 2 * cfg.pretrain.batch_size
    assert summary["best_val_accuracy"] > 0.2  # ten glyph classes: chance is 0.1
    assert (workdir / "models" / "pretrain" / "_COMPLETE").exists()
    assert (workdir / "models" / "pretrain" / "backbone.safetensors").exists()

    # Per-rank step times: each rank measured its own, rank 0 gathered them and names the slowest (run report).
    usage = json.loads((workdir / "reports" / "usage" / "pretrain.json").read_text())
    timing = usage["step_time"]
    assert len(timing["per_rank_ms"]) == 2 and all(ms > 0 for ms in timing["per_rank_ms"]), timing
    assert timing["slowest_rank"] in (0, 1) and timing["slowest_ratio"] >= 1.0
    assert timing["per_rank_ms"][timing["slowest_rank"]] == max(timing["per_rank_ms"])
    line = re.search(r"\[pretrain\] step time: median ([\d.]+) ms over 2 ranks; slowest rank (\d) at ([\d.]+)x",
                     rank0_out)
    assert line, rank0_out
    assert int(line.group(2)) == timing["slowest_rank"]
    assert "step time:" not in outputs[1][1]  # one report, from rank 0
    assert usage["device_kind"] == "cpu"
    assert usage["device_hours"] == pytest.approx(usage["wall_time_s"] * 2 / 3600, abs=2e-6)  # two processes

    # Curves: rank 0 alone writes them, every logged step once.
    logged = (workdir / "models" / "pretrain" / "curves" / "plots" / "metrics" / "train" / "step" / "loss.tsv")
    steps = [int(row.split("\t")[0]) for row in logged.read_text().splitlines()[1:]]
    from pipeline.training.curve_logging import curve_interval

    every = curve_interval(expected_steps, cfg.trainer.log_every_n_steps)  # short runs log their curves more often
    assert steps == sorted({*range(every, expected_steps + 1, every), expected_steps})
