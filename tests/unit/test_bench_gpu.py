"""The GPU benchmark's code paths on CPU (--smoke), its FLOP count and peak table; no timing asserts."""
from __future__ import annotations

import json

import pytest

from bench import gpu


def test_bf16_peak_by_device_name():
    assert gpu.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.bf16_peak("NVIDIA H200") == 989e12
    assert gpu.bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu.bf16_peak("Some Future Card") is None


def test_vit_b16_training_flops_match_the_published_forward_count():
    # ViT-B/16 at 224: ~17.6 GMACs forward (Dosovitskiy et al.) -> ~35 GFLOPs, x3 for training.
    flops = gpu.vit_analytic_flops((3, 224, 224), patch=16, dim=768, depth=12, classes=1000)
    assert flops == pytest.approx(3 * 2 * 17.56e9, rel=0.02)


@pytest.mark.slow
def test_smoke_run_writes_every_number(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    gpu.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["smoke"] is True
    (pretrain,) = report["pretrain"]
    assert len(pretrain["rows"]) == 3 and all(row["images_per_s"] > 0 for row in pretrain["rows"])
    (vit,) = report["vit"]
    assert vit["lightning"]["images_per_s"] > 0 and vit["pytorch"]["images_per_s"] > 0
    assert vit["train_flops_per_image_analytic"] > 0 and vit["mfu_lightning"] is None  # no peak on CPU
    assert vit["fp32_eager"]["images_per_s"] > 0 and vit["speedup_over_fp32_eager"] > 0
    assert report["errors"] == {}
    printed = capsys.readouterr().out
    assert "SPEEDUP" in printed and "RATIO Lightning / PyTorch" in printed
    assert "SPEEDUP bf16 + compile / fp32 eager" in printed


@pytest.mark.slow
def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(gpu, "pretrain_section", broken)
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit, match="sections failed: pretrain"):
        gpu.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["errors"] == {"pretrain": "RuntimeError: CUDA out of memory"}
    assert report["vit"][0]["lightning"]["images_per_s"] > 0  # the ViT section ran and was saved
