"""Reading the output of `prepare` (and of `corpus`): the manifest, and its splits as shards or arrays."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.data.shards import SplitShards, read_shard, split_shards
from pipeline.data.stream import InMemorySplit
from pipeline.data.splits import SPLITS, select_indices


@dataclass
class PreparedData:
    uri: str
    manifest: dict

    @property
    def class_names(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        height, width, channels = self.manifest["image_shape"]
        return channels, height, width

    def split(self, which: str) -> SplitShards:
        """Where split `which` lives: streamed by the training stages, each rank its share."""
        return split_shards(self.uri, self.manifest, which)

    def subset(self, which: str, per_class: int | None = None, seed: int = 0) -> InMemorySplit:
        """Split `which` in memory; with `per_class`, the seeded label-budget sample of it.

        The sample is drawn from the manifest's labels (no pixels read), then only the split's
        shards are read and only the chosen images kept: memory is the budget, not the dataset.
        """
        files = self.manifest["files"]
        index = {name: i for i, name in enumerate(self.class_names)}
        labels = np.asarray([index.get(f["class"], -1) for f in files], dtype=np.int64)
        split = np.asarray([SPLITS[f["split"]] for f in files], dtype=np.int8)
        chosen = select_indices(labels, split, len(self.class_names), which, per_class, seed)
        wanted = {files[i]["key"]: position for position, i in enumerate(chosen)}
        shards = self.split(which)
        channels, height, width = shards.image_shape
        images = np.empty((len(wanted), height, width, channels), dtype=np.uint8)
        found = np.empty(len(wanted), dtype=np.int64)
        seen = 0
        for uri, count in zip(shards.uris, shards.counts):
            shard_images, shard_labels, keys = read_shard(uri, count)
            for row, key in enumerate(keys):
                if (position := wanted.get(key)) is not None:
                    images[position], found[position] = shard_images[row], shard_labels[row]
                    seen += 1
        if seen != len(wanted):
            raise OSError(f"{self.uri}: {len(wanted) - seen} of the manifest's {which} images are in no shard")
        return InMemorySplit(images, found)


def load_prepared(uri: str, produced_by: str = "prepare") -> PreparedData:
    storage.require_complete(uri, produced_by=produced_by)
    return PreparedData(uri, storage.read_json(storage.join(uri, "manifest.json")))
