"""GPU-resident data path of `training.loader`: one gather per batch, same batches as the item-by-item path."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.training import BatchGatherDataset, already_batched


def test_batch_gather_yields_the_same_batches_as_item_reads_and_collate():
    images, labels = torch.randn(37, 1, 8, 8), torch.arange(37)
    gathered = DataLoader(BatchGatherDataset(images, labels), batch_size=8, shuffle=True, collate_fn=already_batched,
                          generator=torch.Generator().manual_seed(0))
    itemwise = DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True,
                          generator=torch.Generator().manual_seed(0))
    pairs = list(zip(gathered, itemwise, strict=True))
    assert len(pairs) == 5
    for (gx, gy), (ix, iy) in pairs:
        assert torch.equal(gx, ix) and torch.equal(gy, iy)
