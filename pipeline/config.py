"""Typed configuration: params.yaml is the single source of hyper-parameters.

Each field's docstring is the documentation users read. Validation (pipeline/params.py) collects *every*
problem (pydantic does) and raises one ConfigError that names each dotted key, so a bad
params file costs one edit, not one edit per error. Overrides use the same dotted keys
as dvc.yaml's `params:` lists: `--set finetune.labels_per_class=all`.
"""
from __future__ import annotations

import hashlib
import json
import math
import posixpath
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


DEFAULT_PARAMS = Path("params.yaml")


class _Section(BaseModel):
    # Unknown keys are errors: a typo like `learning_rate` must not silently do nothing.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def _precision_alias(value: Any) -> Any:
    # YAML reads `precision: 32` as an int and users write "32" or "bf16" from habit.
    aliases = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
    return aliases.get(str(value), value) if isinstance(value, (int, str)) else value


Precision = Annotated[Literal["32-true", "bf16-mixed", "16-mixed"], BeforeValidator(_precision_alias)]


class PathsConfig(_Section):
    root: str = "."
    """Base URI every relative path below is joined to: a local folder or s3://bucket/prefix."""
    prepared: str = "data/prepared"
    """Prepared, split target dataset: webdataset shards and their manifest (output of `prepare`)."""
    corpus: str = "data/corpus"
    """Prepared pretraining corpus: shards and manifest of `pretrain.source` (output of `corpus`)."""
    pretrain: str = "models/pretrain"
    """Pretrained backbone (output of `pretrain`)."""
    finetune: str = "models/finetune"
    """Fine-tuned model and the same-budget scratch baseline (output of `finetune`)."""
    release: str = "models/release"
    """Model bundle with its model card (output of `evaluate`): what promotion points at."""
    reports: str = "reports"
    """Metrics and plots (output of `evaluate`)."""
    checkpoints: str = "checkpoints"
    """Resumable training state. Not a DVC output, so `dvc repro` never deletes it mid-run."""
    registry: str = "registry"
    """Model registry of the flows: champion and last-evaluated pointers plus every archived release.
    Shared by all runs, so never joined with `root`: a folder (relative to the project) or
    s3://bucket/prefix. On Kubernetes it must be a URI every flow-run pod reaches."""
    dvc_remote: str = ""
    """DVC remote of the flows' workspaces (data snapshots, outputs, run-cache): a folder or
    s3://bucket/prefix. Empty: the project's default remote (.dvc/config, `make` adds one)."""
    runs: str = "runs"
    """Where the flows create one workspace per run (relative to the project)."""

    UNROOTED: ClassVar[frozenset[str]] = frozenset({"registry", "dvc_remote", "runs"})

    def project_uri(self, name: str, project: Path) -> str:
        """Location of a flow-level path (registry, dvc_remote, runs): relative ones are under `project`."""
        value = getattr(self, name)
        if not value or "://" in value or value.startswith("/"):
            return value
        return str(project / value)

    def uri(self, name: str) -> str:
        """Absolute location of one path: `root` joined with it unless it is already absolute."""
        value = getattr(self, name)
        if name in self.UNROOTED:
            raise ValueError(f"paths.{name} is not under paths.root; use project_uri()")
        if "://" in value or value.startswith("/") or self.root in ("", "."):
            return value
        return posixpath.join(self.root.rstrip("/"), value)


class DataConfig(_Section):
    source: str = "builtin:digits"
    """`builtin:digits` (scikit-learn's 1,797 real 8x8 digits), a local ImageFolder
    (`<class>/<image>.png|jpg`), or the same layout under s3://bucket/prefix."""
    version: str | None = None
    """Content id of the source, set by the flow's data-versioning step so DVC re-runs `prepare`
    when (and only when) the images change; `prepare` refuses data that no longer matches it."""
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of each class held out for validation (stratified)."""
    test_fraction: float = Field(0.25, gt=0, lt=0.5)
    """Share of each class held out for the final test (stratified)."""
    image_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = "auto"
    """Side in pixels of the square images every stage sees (target and pretraining corpus alike): each
    image is EXIF-rotated, its shorter side resized to this, then centre-cropped. `auto` (the default):
    the target source's own size when all its images share one shorter side (the digits demo: 8), so no
    image is resized; a source of mixed sizes is an error asking for a number (docs/data.md). Photos
    want e.g. 224. A number larger than every image is an error (it would only blow them up)."""
    channels: Literal[1, 3] = 1
    """1 (grayscale) or 3 (RGB): every image is converted to this (RGBA is composited on black)."""
    min_image_size: int = Field(8, ge=1)
    """Images whose shorter side is below this many pixels are errors, not blown up into blur."""
    num_workers: int | None = Field(None, ge=1)
    """Processes decoding and resizing images in `prepare` and `corpus`; unset: one per CPU core."""
    shard_mb: int = Field(64, ge=1)
    """Target size of one webdataset shard (decoded pixels): the unit each rank streams and prefetches."""
    cache_mb: int = Field(1024, ge=0)
    """A rank keeps its decoded share of a split in memory after the first epoch when it fits in this
    many MiB (later epochs read nothing); larger shares are streamed from storage every epoch."""


class TrainerConfig(_Section):
    accelerator: Literal["cpu", "gpu", "cuda", "mps", "auto"] = "cpu"
    """Lightning accelerator. `cpu` keeps the demo runnable anywhere."""
    devices: int = Field(1, ge=1)
    """Devices (GPUs or CPU processes) per node."""
    num_nodes: int = Field(1, ge=1)
    """Nodes; world size = num_nodes x devices. Set per pod by the Kubernetes launcher."""
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp"] = "auto"
    """Distribution strategy; `auto` becomes `ddp` when more than one device trains (world size > 1)."""
    precision: Precision = "32-true"
    """`32-true`, `bf16-mixed` (Ampere and newer) or `16-mixed` (with loss scaling)."""
    compile: bool = False
    """torch.compile the model in place, block by block where it has repeated blocks (pays compile time
    once, faster steps after)."""
    channels_last: bool = False
    """Use channels_last memory format for convolutional backbones (faster on tensor cores)."""
    deterministic: bool = True
    """Deterministic kernels: the same seed gives the same metrics on the same hardware."""
    data_on_device: bool = False
    """Keep the whole dataset in GPU memory (datasets that fit): no host-to-device copy per batch."""
    num_workers: int = Field(0, ge=0)
    """Threads reading shards ahead of training (at least one is always ahead: 0 means one)."""
    log_every_n_steps: int = Field(10, ge=1)
    """How often progress lines and metrics are logged."""

    @property
    def world_size(self) -> int:
        """Processes training together: num_nodes x devices."""
        return self.num_nodes * self.devices

    @model_validator(mode="after")
    def _ddp_when_distributed(self) -> "TrainerConfig":
        # The one place of the rule "more than one device means DDP": flow forms, the Kubernetes launcher
        # and `dvc repro` all set devices and nodes only.
        if self.strategy == "auto" and self.world_size > 1:
            self.strategy = "ddp"
        return self


class OptimizerConfig(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    """`adamw` (fused kernel on CUDA) or `sgd` (with Nesterov momentum)."""
    lr: float = Field(3e-3, gt=0, le=10)
    """Peak learning rate (reached after warmup)."""
    weight_decay: float = Field(1e-4, ge=0)
    """Decoupled weight decay; not applied to biases and norm weights."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum (ignored by AdamW)."""
    reference_batch_size: int | None = Field(None, ge=1)
    """If set, scale `lr` linearly by global_batch / reference_batch_size (large-batch rule)."""

    def scaled_lr(self, global_batch: int) -> float:
        """The peak learning rate at this global batch: the linear scaling rule (Goyal et al. 2017) when a
        reference batch size is configured, else `lr` as given."""
        if self.reference_batch_size is None:
            return self.lr
        return self.lr * global_batch / self.reference_batch_size


class ScheduleConfig(_Section):
    name: Literal["cosine", "onecycle", "constant"] = "cosine"
    """Per-step schedule: linear warmup then cosine decay, torch's OneCycle, or constant."""
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of all steps spent warming up linearly from ~0 (cosine and onecycle)."""
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    """Final learning rate as a fraction of the peak (cosine)."""


class ModelConfig(_Section):
    arch: Literal["cnn", "resnet", "vit"] = "cnn"
    """`cnn`: small ResNet-style net for tiny images (the digits demo); `resnet`: ImageNet-style ResNet
    for real photos; `vit`: Vision Transformer (GPU-sized). docs/models.md compares them."""
    width: int = Field(32, ge=4)
    """Channels of the first stage (CNN, ResNet: stage i has width x 2**i), or ViT embedding dimension."""
    depth: int = Field(2, ge=1)
    """Residual stages (CNN) or transformer blocks (ViT); ResNet ignores it (see `blocks`)."""
    blocks: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [2, 2, 2, 2], min_length=1)
    """Residual blocks per stage (ResNet only; one entry per stage): [2, 2, 2, 2] is ResNet-18's layout,
    [3, 4, 6, 3] ResNet-34's."""
    heads: int = Field(4, ge=1)
    """Attention heads (ViT only)."""
    patch_size: int = Field(2, ge=1)
    """Patch side in pixels (ViT only)."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout before the classification head."""


class _TrainStage(_Section):
    epochs: int = Field(10, ge=1)
    """Training epochs; the step budget is epochs x steps per epoch, fixed before training."""
    batch_size: int = Field(64, ge=1)
    """Per-device batch size."""
    accumulate_grad_batches: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    checkpoint_every_n_steps: int = Field(25, ge=1)
    """Resumable checkpoint interval, the most progress a preemption can lose."""

    # Derived values, computed here only: stages, benches and the fit plan call these.
    def global_batch(self, world: int) -> int:
        """Samples per optimizer step across all ranks."""
        return self.batch_size * self.accumulate_grad_batches * world

    def steps_per_epoch(self, samples: int, world: int) -> int:
        """Optimizer steps per epoch, as Lightning counts them with a DistributedSampler."""
        batches = math.ceil(math.ceil(samples / world) / self.batch_size)
        return math.ceil(batches / self.accumulate_grad_batches)

    def total_steps(self, samples: int, world: int) -> int:
        """The step budget, fixed before training: a resumed run ends exactly where an uninterrupted one does."""
        return self.epochs * self.steps_per_epoch(samples, world)

    def lr(self, world: int) -> float:
        """The peak learning rate at this world size (OptimizerConfig.scaled_lr of the global batch)."""
        return self.optimizer.scaled_lr(self.global_batch(world))


def _objective_alias(value: Any) -> Any:
    # `glyphs` was the name of the supervised objective when glyphs were its only data.
    return "supervised" if value == "glyphs" else value


class PretrainConfig(_TrainStage):
    model: ModelConfig = ModelConfig()
    source: str = "builtin:glyphs"
    """The pretraining corpus, separate from the target `data.source`: `builtin:glyphs` (synthetic
    printed digits, the demo's), an ImageFolder (`<class>/<image>`, labelled) or a plain folder of
    unlabelled images, local or s3://. Versioned and cached on its own: changing the target data never
    re-runs pretraining."""
    version: str | None = None
    """Content id of the corpus, pinned by the flow like `data.version`; `corpus` refuses other content."""
    objective: Annotated[Literal["supervised", "simclr"], BeforeValidator(_objective_alias)] = "supervised"
    """`supervised`: classify the corpus's own labels (needs a labelled corpus: glyphs or an ImageFolder);
    `simclr`: self-supervised contrastive learning, labels ignored (any corpus)."""
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Share of the corpus held out to validate pretraining."""
    glyphs_per_class: int = Field(500, ge=10)
    """Synthetic images rendered per glyph class (source `builtin:glyphs`)."""
    temperature: float = Field(0.2, gt=0, le=10)
    """NT-Xent softmax temperature of the self-supervised (SimCLR) objective."""
    projection_dim: int = Field(64, ge=2)
    """Output size of the projection MLP that is discarded after pretraining."""


class FinetuneConfig(_TrainStage):
    labels_per_class: int | Literal["all"] = 4
    """Labelled training images per target class (the label budget), or `all`."""
    freeze_backbone_epochs: int = Field(1, ge=0)
    """Epochs that train only the new head before the backbone is unfrozen."""
    backbone_lr_ratio: float = Field(0.1, gt=0, le=1)
    """Backbone learning rate as a fraction of the head's once unfrozen."""
    head_init: Literal["imprint", "random"] = "imprint"
    """The new head's start: `imprint` sets each class's weights to its mean pretrained feature (a
    nearest-class-mean classifier before any step); `random` is the usual random init."""
    augment: bool = False
    """Random affine + noise augmentation of training batches (both fine-tuned and scratch)."""
    train_scratch_baseline: bool = True
    """Also train the same model from random weights on the same budget and schedule."""

    @model_validator(mode="after")
    def _freeze_within_budget(self) -> "FinetuneConfig":
        if isinstance(self.labels_per_class, int) and self.labels_per_class < 1:
            raise ValueError("labels_per_class must be >= 1 or 'all'")
        if self.freeze_backbone_epochs >= self.epochs:
            raise ValueError(
                f"freeze_backbone_epochs ({self.freeze_backbone_epochs}) must be < epochs ({self.epochs})"
            )
        return self


class EvaluateConfig(_Section):
    batch_size: int = Field(256, ge=1)
    """Inference batch size."""
    promotion_margin: float = Field(0.0, ge=0, le=1)
    """Challenger must beat the champion's test accuracy by more than this to be promoted."""


class Config(_Section):
    seed: int = 42
    """Seeds data splits, label-budget sampling, initialisation and data order."""
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    trainer: TrainerConfig = TrainerConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig(epochs=30, batch_size=32)
    evaluate: EvaluateConfig = EvaluateConfig()

    def fingerprint(self, *sections: str) -> str:
        """Short content hash of the named sections: identifies resumable state."""
        dumped = self.model_dump(mode="json")
        payload = {s: dumped[s] for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
