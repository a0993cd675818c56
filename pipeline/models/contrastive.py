"""Self-supervised pretraining (SimCLR, Chen et al. 2020): no labels at all.

Two random augmentations of each image must find each other among the batch (NT-Xent
loss). The backbone learns features that transfer to any labelling of these images, so
the target task's labels are never used before fine-tuning. Validation reports the same
label-free pair-retrieval accuracy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.augment import random_affine
from pipeline.models.classifier import Classifier


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))  # an image is not its own positive
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    loss = F.cross_entropy(similarity, targets)
    accuracy = (similarity.argmax(dim=1) == targets).float().mean()
    return loss, accuracy


class ContrastivePretrainer(Classifier):
    """Reuses Classifier's backbone, optimizer and schedule; the 'head' is a projection MLP."""

    def __init__(self, *args, temperature: float = 0.2, projection_dim: int = 64, **kwargs):
        super().__init__(*args, num_classes=projection_dim, **kwargs)
        features = self.backbone.features
        self.head = nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True), nn.Linear(features, projection_dim))

    def _step(self, batch, split: str) -> torch.Tensor:
        images, _labels = batch  # labels are deliberately ignored
        z1, z2 = self(random_affine(images)), self(random_affine(images))
        loss, accuracy = nt_xent(z1.float(), z2.float(), self.hparams.temperature)
        self.record(split, loss, accuracy, len(images))
        return loss
