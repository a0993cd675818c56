"""Reading the output of `prepare`: arrays plus the manifest that describes them."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.data.tasks import TaskArrays, select


@dataclass
class PreparedData:
    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    manifest: dict

    @property
    def class_names(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        height, width, channels = self.manifest["image_shape"]
        return channels, height, width

    def subset(self, which: str, per_class: int | None = None, seed: int = 0) -> TaskArrays:
        return select(self.images, self.labels, self.split, self.class_names, which, per_class, seed)


def load_prepared(uri: str) -> PreparedData:
    storage.require_complete(uri, produced_by="prepare")
    arrays = np.load(io.BytesIO(storage.read_bytes(storage.join(uri, "dataset.npz"))))
    manifest = storage.read_json(storage.join(uri, "manifest.json"))
    return PreparedData(arrays["images"], arrays["labels"], arrays["split"], manifest)
