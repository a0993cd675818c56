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
from pipeline.data.stream import to_float
from pipeline.models.augment import random_affine
from pipeline.models.backbones import build_backbone
from pipeline.optim import build_optimizer, build_scheduler, param_groups

IMPRINT_SCALE = 10.0  # logits = 10 x cosine: confident enough to classify, soft enough to keep learning


class RunningMeans:
    """One epoch's training loss and accuracy, summed on the device: no host sync per step.

    A plain object, not module state: assigning to a LightningModule attribute goes through
    nn.Module.__setattr__, which is slow enough to show in a small model's step.
    """

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(2, device=device)
        self.count = 0
        self.last_loss: torch.Tensor | None = None  # ProgressLines prints it every log_every_n_steps

    def add(self, loss: torch.Tensor, accuracy: torch.Tensor, count: int) -> None:
        self.last_loss = loss.detach()
        self.sums.add_(torch.stack([self.last_loss, accuracy.detach()]).float(), alpha=count)
        self.count += count

    def means(self) -> torch.Tensor:
        return self.sums / max(self.count, 1)


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

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # uint8 pixels cross to the GPU (a quarter of float32's bytes) and are scaled there.
        images, labels = batch
        return to_float(images), labels

    def compile_regions(self) -> list[nn.Module]:
        """The blocks training.compile_in_place compiles one by one: a ViT's encoder layers."""
        return list(getattr(self.backbone, "compile_regions", lambda: [])())

    @torch.no_grad()
    def imprint_head(self, images: torch.Tensor, labels: torch.Tensor, scale: float = IMPRINT_SCALE) -> None:
        """Weight imprinting (Qi et al., CVPR 2018): each class's head row is its mean feature's direction.

        The new head then starts as a nearest-class-mean classifier on the pretrained features
        instead of at chance, so fine-tuning begins from the backbone's accuracy and the first
        gradients refine features rather than undo them (the LP-FT argument, Kumar et al. 2022).
        Logits come out as `scale` x cosine similarity at an average feature norm.
        """
        training = self.backbone.training
        self.backbone.eval()  # BatchNorm uses its pretraining statistics
        features = torch.cat([self.backbone(images[i:i + 512].to(self.device)).float() for i in range(0, len(images), 512)])
        self.backbone.train(training)
        labels = labels.to(features.device)
        linear: nn.Linear = self.head[-1]
        length = scale / features.norm(dim=1).mean()
        for cls in labels.unique():
            linear.weight[cls] = F.normalize(features[labels == cls].mean(dim=0), dim=0) * length
        linear.bias.zero_()

    # ---- backbone freezing (transfer learning)
    @property
    def backbone_frozen(self) -> bool:
        return self.current_epoch < self.hparams.freeze_backbone_epochs

    def on_train_start(self) -> None:
        # A run resumed mid-epoch gets no on_train_epoch_start from Lightning: set the state here too.
        self.on_train_epoch_start()

    def on_train_epoch_start(self) -> None:
        frozen = self.backbone_frozen
        self.backbone.requires_grad_(not frozen)
        # A frozen backbone also keeps its BatchNorm statistics from pretraining.
        self.backbone.train(not frozen)
        self.train_means = RunningMeans(self.device)

    def on_train_epoch_end(self) -> None:
        loss, accuracy = self.train_means.means()
        self.log("train/loss", loss, sync_dist=True)
        self.log("train/acc", accuracy, sync_dist=True)

    def record(self, split: str, loss: torch.Tensor, accuracy: torch.Tensor, count: int) -> None:
        """Training steps add to device-side epoch sums; validation goes through self.log.

        Lightning's self.log costs about 0.7 ms of host time per call (it walks its result
        objects every time): two calls a step were ~1.5 ms of the pretrain module's 15 ms CPU
        step, and a small model's GPU step is host time. Sums on the device cost one tiny kernel
        and no synchronisation; they are logged once per epoch.
        """
        if split == "train":
            self.train_means.add(loss, accuracy, count)
            return
        self.log(f"{split}/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{split}/acc", accuracy, on_epoch=True, prog_bar=True, sync_dist=True)

    # ---- steps
    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        images, labels = batch
        if self.hparams.augment and split == "train":
            images = random_affine(images)
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.record(split, loss, accuracy, len(labels))
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
        return torch.cat([self(to_float(images[i : i + batch_size].to(self.device))).float().cpu()
                          for i in range(0, len(images), batch_size)])
