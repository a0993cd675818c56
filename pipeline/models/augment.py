"""Batched, on-device image augmentation: random affine (rotate, scale, shift) plus noise.

Runs inside the training step on whole batches, so it costs one grid_sample per batch
on the accelerator instead of per-image Python work on the loader's threads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(images: torch.Tensor, degrees: float = 15.0, scale: float = 0.12, shift: float = 0.15,
                  noise: float = 0.1) -> torch.Tensor:
    n = images.shape[0]
    device, dtype = images.device, images.dtype
    angle = (torch.rand(n, device=device) * 2 - 1) * math.radians(degrees)
    factor = 1 + (torch.rand(n, device=device) * 2 - 1) * scale
    offset = (torch.rand(n, 2, device=device) * 2 - 1) * shift  # fraction of the half-width
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(dtype), list(images.shape), align_corners=False)
    # Background is -1 (images are scaled to [-1, 1]); pad with it, not with zeros.
    warped = F.grid_sample(images + 1, grid, align_corners=False, padding_mode="zeros") - 1
    return warped + noise * torch.randn_like(warped)
