"""Backbones (cnn, resnet, vit), the GPU presets, and the Classifier's transfer and speed features:
imprinted head, resume state, regional compilation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.params import load_config
from pipeline.errors import ConfigError
from pipeline.models.backbones import ResidualBlock, ResNet, build_backbone
from pipeline.models.classifier import Classifier
from pipeline.training import compile_in_place
from tests.conftest import PARAMS, REPO_ROOT

SHAPE = (1, 8, 8)
PRESETS = sorted((REPO_ROOT / "presets").glob("*.yaml"))


def _classifier(model: dict | None = None, **kwargs) -> Classifier:
    cfg = load_config(PARAMS)
    torch.manual_seed(0)
    return Classifier(model=model or dict(arch="cnn", width=8, depth=1, dropout=0.0), image_shape=SHAPE,
                      num_classes=3, optimizer=cfg.finetune.optimizer.model_dump(),
                      schedule=cfg.finetune.schedule.model_dump(), total_steps=10, lr=1e-3, **kwargs)


def test_imprinted_head_classifies_by_the_nearest_class_mean_direction():
    module = _classifier()
    images, labels = torch.randn(30, *SHAPE), torch.arange(30) % 3
    module.imprint_head(images, labels)
    assert module.backbone.training is True  # features came from eval mode; the caller's mode is restored
    module.eval()
    with torch.no_grad():
        features = module.backbone(images)
        means = torch.stack([features[labels == c].mean(0) for c in range(3)])
        nearest = (F.normalize(features, dim=1) @ F.normalize(means, dim=1).T).argmax(1)
        assert torch.equal(module(images).argmax(1), nearest)
    assert torch.count_nonzero(module.head[-1].bias) == 0


def test_a_run_resumed_mid_epoch_still_freezes_the_backbone():
    # Lightning skips on_train_epoch_start when it resumes mid-epoch; on_train_start must set the state.
    module = _classifier(freeze_backbone_epochs=1)
    module.on_train_start()  # no trainer: current_epoch 0, inside the frozen epoch
    assert not any(p.requires_grad for p in module.backbone.parameters())
    assert module.backbone.training is False and module.train_means.count == 0


def test_a_vit_compiles_block_by_block_and_keeps_its_state_dict_keys():
    vit = _classifier(dict(arch="vit", width=16, depth=3, heads=2, patch_size=4, dropout=0.0))
    keys = list(vit.state_dict())
    compile_in_place(vit)
    assert all(block._compiled_call_impl is not None for block in vit.backbone.blocks)
    assert vit._compiled_call_impl is None  # regions only, not the whole module
    assert list(vit.state_dict()) == keys and not any("_orig_mod" in key for key in keys)

    for model in (None, dict(arch="resnet", width=8, blocks=[1, 1], dropout=0.0)):
        whole = _classifier(model)
        compile_in_place(whole)
        assert whole._compiled_call_impl is not None  # no identical repeated blocks: the whole forward


def test_running_means_weight_each_batch_by_its_size():
    from pipeline.models.classifier import RunningMeans

    means = RunningMeans(torch.device("cpu"))
    means.add(torch.tensor(1.0), torch.tensor(0.5), 30)
    means.add(torch.tensor(4.0), torch.tensor(1.0), 10)
    assert means.means().tolist() == [1.75, 0.625] and means.count == 40
    assert float(means.last_loss) == 4.0


# ---------------------------------------------------------------- backbones


def _resnet(shape: tuple[int, int, int], width: int = 8, blocks: list[int] | None = None) -> ResNet:
    torch.manual_seed(0)
    return build_backbone(ModelConfig(arch="resnet", width=width, blocks=blocks or [2, 2, 2, 2]), shape)


@pytest.mark.parametrize("shape, stem_kernel, pooled", [((3, 224, 224), 7, True), ((3, 64, 96), 7, True),
                                                        ((3, 32, 32), 3, False), ((1, 8, 8), 3, False)])
def test_resnet_takes_the_imagenet_stem_from_64_px_and_a_stride_1_stem_below(shape, stem_kernel, pooled):
    net = _resnet(shape)
    assert net.stem[0].kernel_size == (stem_kernel, stem_kernel)
    assert net.stem[0].stride == ((2, 2) if pooled else (1, 1))
    assert isinstance(net.stem[-1], nn.MaxPool2d) is pooled
    assert net(torch.randn(2, *shape)).shape == (2, net.features) == (2, 8 * 2**3)


def test_resnet_18_layout_at_224_and_channels_last():
    net = _resnet((3, 224, 224), width=64)
    assert sum(p.numel() for p in net.parameters()) == 11_176_512  # torchvision's resnet18 without its fc layer
    assert [len(stage) for stage in net.stages] == [2, 2, 2, 2] and net.features == 512
    sizes = []
    net.stages.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[-1]))
    x = torch.randn(2, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    assert net.stages(net.stem(x)).is_contiguous(memory_format=torch.channels_last)  # no layer falls back to NCHW
    assert net(x).shape == (2, 512) and sizes[-1] == 56  # 224 -> 112 (7x7 stride 2) -> 56 (max-pool)


def test_resnet_blocks_set_stages_and_depth_is_ignored():
    cfg = ModelConfig(arch="resnet", width=8, depth=7, blocks=[3, 1])
    net = build_backbone(cfg, (3, 16, 16))
    assert [len(stage) for stage in net.stages] == [3, 1] and net.features == 16
    for bad in ("[]", "[2, 0]"):
        with pytest.raises(ConfigError, match=r"pretrain\.model\.blocks"):
            load_config(PARAMS, [f"pretrain.model.blocks={bad}"])


def _branch_outputs(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What each residual block's branch (`body`, without the shortcut) adds to its input."""
    outputs = []
    for block in (m for m in net.modules() if isinstance(m, ResidualBlock)):
        block.body.register_forward_hook(lambda _, __, out: outputs.append(out.detach()))
    net(x)
    return outputs


def test_a_fresh_resnet_is_its_shortcuts_residual_branches_add_zero():
    x = torch.randn(4, 3, 64, 64)
    branches = _branch_outputs(_resnet((3, 64, 64)).train(), x)
    assert len(branches) == 8 and all(torch.count_nonzero(b) == 0 for b in branches)
    # The same block without the zero-init (the cnn arch's) adds something: the check above can fail.
    cnn = build_backbone(ModelConfig(arch="cnn"), (3, 64, 64))
    assert all(torch.count_nonzero(b) > 0 for b in _branch_outputs(cnn, x))
    # Only gamma is zeroed and it still gets gradients: the first step moves every branch off zero.
    net = _resnet((3, 64, 64)).train()
    net(x).square().sum().backward()
    assert all(block.body[-1].weight.grad.abs().sum() > 0 for stage in net.stages for block in stage)


def test_vit_at_224_with_patch_16_sees_196_tokens_and_any_size_divisible_by_the_patch():
    cfg = ModelConfig(arch="vit", width=32, depth=1, heads=2, patch_size=16)
    vit = build_backbone(cfg, (3, 224, 224))
    assert vit.position.shape == (1, 196, 32)
    assert vit(torch.randn(2, 3, 224, 224)).shape == (2, 32)
    assert build_backbone(cfg, (3, 160, 96))(torch.randn(1, 3, 160, 96)).shape == (1, 32)  # 10 x 6 patches
    with pytest.raises(ValueError, match="patch_size 16 must divide"):
        build_backbone(cfg, (3, 200, 200))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_each_gpu_preset_loads_and_its_backbone_runs_at_224(preset):
    cfg = load_config(preset)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    assert shape == (3, 224, 224)
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy) == ("gpu", 8, "ddp")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.compile and not cfg.trainer.deterministic
    assert cfg.data.source.startswith("s3://") and cfg.pretrain.source.startswith("s3://")
    backbone = build_backbone(cfg.pretrain.model, shape).eval()
    with torch.no_grad():
        assert backbone(torch.randn(1, *shape)).shape == (1, backbone.features)


def test_the_resnet_preset_scales_lr_linearly_to_its_global_batch():
    cfg = load_config(REPO_ROOT / "presets" / "gpu-real-data.yaml")
    assert cfg.pretrain.model.arch == "resnet" and cfg.trainer.channels_last
    assert cfg.pretrain.global_batch(cfg.trainer.world_size) == 1024
    assert cfg.pretrain.lr(cfg.trainer.world_size) == pytest.approx(0.4)  # 0.1 per 256 x 1,024
