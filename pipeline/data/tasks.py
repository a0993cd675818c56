"""Selecting a split (and a label budget) from the prepared dataset."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class TaskArrays:
    images: torch.Tensor  # float32 (N, C, H, W), scaled to [-1, 1]
    labels: torch.Tensor  # int64 class indices
    classes: list[str]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5) - 1.0


def select(images: np.ndarray, labels: np.ndarray, split: np.ndarray, classes: list[str], which: str,
           per_class: int | None = None, seed: int = 0) -> TaskArrays:
    """Images of split `which`; with `per_class`, a seeded sample of that many per class (the label budget)."""
    chosen = np.flatnonzero(split == SPLITS[which])
    if per_class is not None:
        rng = np.random.default_rng(seed)
        chosen = np.sort(np.concatenate([
            rng.permutation(chosen[labels[chosen] == label])[:per_class] for label in range(len(classes))
        ]))
    return TaskArrays(to_tensor(images[chosen]), torch.from_numpy(labels[chosen].astype(np.int64)), list(classes))
