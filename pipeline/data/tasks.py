"""Selecting a split (and a label budget) by index, from labels alone."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class TaskArrays:
    """Float images in memory: what the benchmarks' hand-written loops and ad-hoc callers use."""

    images: torch.Tensor  # float32 (N, C, H, W), scaled to [-1, 1]
    labels: torch.Tensor  # int64 class indices
    classes: list[str]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5) - 1.0


def select_indices(labels: np.ndarray, split: np.ndarray, num_classes: int, which: str,
                   per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted indices of split `which`; with `per_class`, a seeded sample of that many per class (the label budget)."""
    chosen = np.flatnonzero(split == SPLITS[which])
    if per_class is not None:
        rng = np.random.default_rng(seed)
        chosen = np.sort(np.concatenate([
            rng.permutation(chosen[labels[chosen] == label])[:per_class] for label in range(num_classes)
        ]))
    return chosen
