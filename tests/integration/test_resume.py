"""SIGTERM mid-training: exit 143 after a checkpoint; the re-run resumes and ends at the same total steps."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pipeline.params import load_config
from pipeline.models.bundle import load_backbone
from pipeline.stages import stage_runner
from tests.conftest import PYTHON, TINY, run_cli, sets, sigterm_at_step, step_numbers

# Long enough that SIGTERM lands mid-training on a fast machine, short enough for CI.
RESUMABLE = [*TINY, "pretrain.glyphs_per_class=60", "pretrain.batch_size=16", "pretrain.epochs=3",
             "pretrain.checkpoint_every_n_steps=5", "trainer.log_every_n_steps=1"]


def _expected_steps(workdir: Path) -> int:
    cfg = load_config(workdir / "params.yaml", RESUMABLE)
    train_images = 10 * cfg.pretrain.glyphs_per_class * 9 // 10
    return cfg.pretrain.epochs * cfg.pretrain.steps_per_epoch(train_images, 1)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_resumes_to_the_same_total(workdir):
    stage_runner("corpus")(load_config(workdir / "params.yaml", [*RESUMABLE, f"paths.root={workdir}"]))
    total = _expected_steps(workdir)

    code, out, signalled_at = sigterm_at_step([PYTHON, "-m", "pipeline", "pretrain", *sets(RESUMABLE)], workdir,
                                              min_step=7)
    assert signalled_at is not None, "training never reported progress:\n" + out
    assert code == 143, out
    assert "terminated by SIGTERM" in out
    assert signalled_at < total, "training finished before SIGTERM arrived; make RESUMABLE longer"
    saved = re.search(r"\[checkpoint\] SIGTERM at step (\d+): saved (\S+)", out)
    assert saved, out
    stopped_at = int(saved.group(1))
    assert signalled_at <= stopped_at < total
    last = Path(saved.group(2))
    last = last if last.is_absolute() else workdir / last
    assert last.name == "last.ckpt" and last.exists()
    assert list(workdir.glob("checkpoints/pretrain-*/last.ckpt")) == [last]
    assert not (workdir / "models" / "pretrain").exists()  # an interrupted stage publishes nothing

    resumed = run_cli(["pretrain", *sets(RESUMABLE)], cwd=workdir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    match = re.search(r"resuming from (\S+) at step (\d+)", resumed.stdout)
    assert match, resumed.stdout
    assert Path(match.group(1)).name == "last.ckpt" and int(match.group(2)) == stopped_at > 0
    steps_run = step_numbers(resumed.stdout)
    assert steps_run and steps_run[0] == stopped_at + 1 and steps_run[-1] == total  # no step lost, none repeated

    summary = json.loads((workdir / "models" / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == total
    # Reused work is a run fact: the run report's, not the output's (which an uninterrupted run would equal).
    assert json.loads((workdir / "reports" / "usage" / "pretrain.json").read_text())["resumed_from_step"] == stopped_at
    assert (workdir / "models" / "pretrain" / "_COMPLETE").exists()

    # The resumed run restarted mid-epoch at the batch it had reached, with the RNG state of that moment
    # (pipeline/data/stream.py, training.ResumeCheckpoint): its weights are an uninterrupted run's, exactly.
    reference = workdir / "reference"
    fresh = run_cli(["pretrain", *sets([*RESUMABLE, f"paths.root={reference}",
                                        f"paths.corpus={workdir / 'data' / 'corpus'}"])], cwd=workdir)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    resumed_weights = load_backbone(str(workdir / "models/pretrain/backbone.safetensors"))["backbone"]
    fresh_weights = load_backbone(str(reference / "models/pretrain/backbone.safetensors"))["backbone"]
    assert resumed_weights.keys() == fresh_weights.keys()
    assert all(torch.equal(resumed_weights[k], fresh_weights[k]) for k in fresh_weights)

    # The training curves (DVCLive) continue across the SIGTERM: every step once, the uninterrupted run's values.
    def rows(root: Path, name: str) -> list[tuple[int, float]]:
        lines = (root / "models/pretrain/curves/plots/metrics" / name).read_text().splitlines()[1:]
        return [(int(step), float(value)) for step, value in (line.split("\t") for line in lines)]

    for name in ("train/step/loss.tsv", "train/step/lr.tsv", "val/acc.tsv"):
        resumed_rows, fresh_rows = rows(workdir, name), rows(reference, name)
        assert [s for s, _ in resumed_rows] == [s for s, _ in fresh_rows], name
        assert [v for _, v in resumed_rows] == pytest.approx([v for _, v in fresh_rows], rel=1e-5), name
    assert [s for s, _ in rows(workdir, "train/step/loss.tsv")] == list(range(1, total + 1))
