"""The one LightningModule: a backbone plus a linear head, used by every training stage.

Fine-tuning puts a new head on the pretrained backbone, keeps the backbone frozen for the first N epochs, then trains it at a lower
learning rate than the head. The scratch baseline is the same module with a random
backbone and no freezing.
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig, OptimizerConfig, ScheduleConfig
from pipeline.models.augment import random_affine
from pipeline.models.backbones import build_backbone
from pipeline.optim import build_optimizer, build_scheduler, param_groups


class Classifier(L.LightningModule):
    def __init__(
        self,
        model: dict,
        image_shape: tuple[int, int, int],
        num_classes: int,
        optimizer: dict,
        schedule: dict,
        total_steps: int,
        lr: float,
        backbone_lr_ratio: float = 1.0,
        freeze_backbone_epochs: int = 0,
        channels_last: bool = False,
        augment: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()  # plain dicts: checkpoints load without this repo's config classes
        model_cfg = ModelConfig(**model)
        self.backbone = build_backbone(model_cfg, tuple(image_shape))
        self.head = nn.Sequential(nn.Dropout(model_cfg.dropout), nn.Linear(self.backbone.features, num_classes))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images.contiguous(memory_format=self.memory_format)))

    # ---- backbone freezing (transfer learning)
    @property
    def backbone_frozen(self) -> bool:
        return self.current_epoch < self.hparams.freeze_backbone_epochs

    def on_train_epoch_start(self) -> None:
        frozen = self.backbone_frozen
        self.backbone.requires_grad_(not frozen)
        # A frozen backbone also keeps its BatchNorm statistics from pretraining.
        self.backbone.train(not frozen)

    # ---- steps
    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        images, labels = batch
        if self.hparams.augment and split == "train":
            images = random_affine(images)
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        self.log(f"{split}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        opt_cfg, sched_cfg = OptimizerConfig(**self.hparams.optimizer), ScheduleConfig(**self.hparams.schedule)
        groups = param_groups(
            {"backbone": (self.backbone, self.hparams.backbone_lr_ratio), "head": (self.head, 1.0)},
            opt_cfg.weight_decay,
        )
        optimizer = build_optimizer(opt_cfg, groups, self.hparams.lr, on_cuda=self.device.type == "cuda")
        scheduler = build_scheduler(optimizer, sched_cfg, self.hparams.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        self.eval()
        return torch.cat([self(images[i : i + batch_size].to(self.device)).float().cpu()
                          for i in range(0, len(images), batch_size)])
