"""Smoke tests of the CPU benchmark helpers on tiny sizes: code paths and invariants, no timing asserts."""
from __future__ import annotations

import json

import pytest
import torch

from bench import cpu, parity
from bench.common import pretrain_classifier
from bench.transfer import TestAccuracyProbe
from pipeline.params import load_config
from pipeline.data.glyphs import GLYPHS
from pipeline.data.tasks import TaskArrays
from tests.conftest import PARAMS, TINY

SHAPE = (1, 8, 8)


def _tiny_cfg(tmp_path, *extra):
    return load_config(PARAMS, [*TINY, f"paths.root={tmp_path}", *extra])


@pytest.mark.slow
def test_lightning_and_torch_loops_give_the_same_per_step_losses(tmp_path):
    from pipeline.data.glyphs import render_glyphs
    from pipeline.data.tasks import to_tensor

    cfg = _tiny_cfg(tmp_path, "pretrain.epochs=2")
    images, labels = render_glyphs(cfg.pretrain.glyphs_per_class, SHAPE, cfg.seed)
    train = TaskArrays(to_tensor(images), torch.from_numpy(labels), list(GLYPHS))
    lightning = parity.lightning_loop(cfg, train, SHAPE, 5)
    torch_run = parity.torch_loop(cfg, train, SHAPE, 5)
    assert len(lightning.losses) == len(torch_run.losses) == 5
    assert lightning.losses == pytest.approx(torch_run.losses, abs=1e-6)  # augmentation and dropout are on in both
    assert lightning.steady_step_s > 0 and torch_run.seconds > 0


def test_accuracy_probe_restores_train_and_eval_modes():
    cfg = load_config(PARAMS, TINY)
    module = pretrain_classifier(cfg, SHAPE, len(GLYPHS), total_steps=4)
    module.train()
    module.backbone.eval()  # as a frozen backbone is during fine-tuning
    test = TaskArrays(torch.randn(20, *SHAPE), torch.randint(0, 10, (20,)), list(GLYPHS))
    probe = TestAccuracyProbe(test, every=1)
    accuracy = probe.accuracy(module)
    assert 0.0 <= accuracy <= 1.0
    assert module.training and module.head.training and not module.backbone.training
    probe.curve = [(2, 0.1, 0.3), (4, 0.2, 0.6), (6, 0.3, 0.5)]
    assert probe.first_reaching(0.5) == (4, 0.2)
    assert probe.first_reaching(0.9) is None


@pytest.mark.slow
def test_bench_cpu_main_on_tiny_sizes_prints_every_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = cpu.main(["--skip-flow", "--parity-epochs", "1", "--repeats", "1", "--workdir", str(tmp_path / "work"),
                       "--json", str(out), *(arg for o in TINY for arg in ("--set", o))])
    printed = capsys.readouterr().out
    assert "RATIO lightning/pytorch wall time" in printed and "RATIO finetuned/scratch" in printed
    assert report["lightning_overhead"]["max_abs_loss_diff"] < 1e-5
    transfer = report["transfer_speed"]
    assert transfer["scratch"]["steps"] <= transfer["total_steps"]
    assert json.loads(out.read_text())["transfer_speed"]["target_test_accuracy"] == transfer["target_test_accuracy"]
