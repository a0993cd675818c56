"""Flow parameters: a typed model the Prefect UI renders as a form. They overlay params.yaml."""
from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field


class TrainingParameters(BaseModel):
    """Unset fields keep params.yaml's value."""

    data_source: str | None = Field(None, description="builtin:digits, a local ImageFolder path, or s3://bucket/prefix")
    image_size: int | None = Field(None, ge=1, le=4096, description="side every image is resized and cropped to "
                                                                   "(photos: 224; the digits demo: 8)")
    channels: Literal[1, 3] | None = Field(None, description="1 grayscale or 3 RGB")
    pretrain_source: str | None = Field(
        None, description="pretraining corpus: builtin:glyphs, an ImageFolder, or a folder of unlabelled images "
                          "(local or s3://); versioned and cached apart from the target data")
    pretrain_objective: Literal["supervised", "simclr"] | None = Field(
        None, description="supervised (a labelled corpus) or simclr (labels ignored)")
    labels_per_class: int | Literal["all"] | None = Field(None, description="label budget per class for fine-tuning")
    pretrain_epochs: int | None = Field(None, ge=1)
    finetune_epochs: int | None = Field(None, ge=1)
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] | None = None
    # On Kubernetes the launch ConfigMap's overlay decides the shape of pretrain/finetune (nodes, GPUs per node,
    # placement, resources); these three change it only when set, and a contradiction with the overlay fails
    # the run before any Job (pipeline/launch/shape.py).
    accelerator: Literal["cpu", "gpu", "auto"] | None = Field(
        None, description="Kubernetes: unset follows the overlay; cpu with a GPU overlay is an error")
    devices: int | None = Field(None, ge=1, description="devices per node (Kubernetes: GPUs per pod, at most the "
                                                        "overlay's gpus_per_node; unset: the overlay's)")
    num_nodes: int | None = Field(None, ge=1, description="nodes (Kubernetes: pods; unset: the overlay's nodes)")
    seed: int | None = None
    promotion_margin: float | None = Field(None, ge=0, le=1, description="challenger must win by more than this")
    launcher: Literal["local", "kubernetes"] = Field(
        # Per deployment: the Kubernetes work pool's flow-run pods set PIPELINE_LAUNCHER=kubernetes.
        default_factory=lambda: os.environ.get("PIPELINE_LAUNCHER", "local"), description="where stages run")
    force: bool = Field(False, description="re-run every stage and retrain even if nothing changed")
    extra_overrides: list[str] = Field(default_factory=list, description="more params as key.path=value")

    def overrides(self) -> list[str]:
        mapping = {
            "data.source": self.data_source,
            "data.image_size": self.image_size,
            "data.channels": self.channels,
            "pretrain.source": self.pretrain_source,
            "pretrain.objective": self.pretrain_objective,
            "finetune.labels_per_class": self.labels_per_class,
            "pretrain.epochs": self.pretrain_epochs,
            "finetune.epochs": self.finetune_epochs,
            "trainer.precision": self.precision,
            "trainer.accelerator": self.accelerator,
            "trainer.devices": self.devices,
            "trainer.num_nodes": self.num_nodes,
            "seed": self.seed,
            "evaluate.promotion_margin": self.promotion_margin,
        }
        return [f"{key}={value}" for key, value in mapping.items() if value is not None] + list(self.extra_overrides)
