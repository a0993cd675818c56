"""Saving and loading trained classifiers as self-describing files (hparams + weights)."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from pipeline import storage
from pipeline.models.classifier import Classifier


def save_classifier(module: Classifier, classes: list[str], path: Path) -> None:
    torch.save({"hparams": dict(module.hparams), "state_dict": module.state_dict(), "classes": classes}, path)


def load_classifier(uri: str) -> tuple[Classifier, list[str]]:
    bundle = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=False)
    module = Classifier(**bundle["hparams"])
    module.load_state_dict(bundle["state_dict"])
    return module.eval(), bundle["classes"]
