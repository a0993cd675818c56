"""Selecting a split (and a label budget) by index, from labels alone: numpy only, so the data stages
(`prepare`, `corpus`) load no torch."""
from __future__ import annotations

import numpy as np

SPLITS = {"train": 0, "val": 1, "test": 2}


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
