"""Float images in memory, for the benchmarks' hand-written loops and ad-hoc callers (the stages stream shards)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TaskArrays:
    images: torch.Tensor  # float32 (N, C, H, W), scaled to [-1, 1]
    labels: torch.Tensor  # int64 class indices
    classes: list[str]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5) - 1.0
