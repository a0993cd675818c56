"""The Classifier's transfer and speed features: imprinted head, resume state, regional compilation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import load_config
from pipeline.models.classifier import Classifier
from pipeline.training import compile_in_place
from tests.conftest import PARAMS

SHAPE = (1, 8, 8)


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

    cnn = _classifier()
    compile_in_place(cnn)
    assert cnn._compiled_call_impl is not None  # no repeated blocks: the whole forward


def test_running_means_weight_each_batch_by_its_size():
    from pipeline.models.classifier import RunningMeans

    means = RunningMeans(torch.device("cpu"))
    means.add(torch.tensor(1.0), torch.tensor(0.5), 30)
    means.add(torch.tensor(4.0), torch.tensor(1.0), 10)
    assert means.means().tolist() == [1.75, 0.625] and means.count == 40
    assert float(means.last_loss) == 4.0
