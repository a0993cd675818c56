"""Stage 3: transfer the pretrained backbone to the labelled *target* task on a small label budget.

A new head is trained on `finetune.labels_per_class` labelled images per class with
the backbone frozen for `freeze_backbone_epochs`, then everything trains, the backbone at
`backbone_lr_ratio` x the head's learning rate. The head starts imprinted
(`head_init: imprint`): each class's weights point at its mean pretrained feature, so the
model classifies by nearest class mean before its first step. The same budget and schedule also train a
scratch model (random backbone, nothing frozen): evaluation's honest baseline.

Validation images are only *reported*, never used to pick a checkpoint: picking on them
would spend labels beyond the budget.

    python -m pipeline finetune --set finetune.labels_per_class=all
"""
from __future__ import annotations

import torch

from pipeline import storage
from pipeline.config import Config
from pipeline.data.prepared import PreparedData, load_prepared
from pipeline.data.stream import InMemorySplit, to_float
from pipeline.models.bundle import load_backbone, save_classifier
from pipeline.models.files import BACKBONE_FILE, SUFFIX as BUNDLE_SUFFIX
from pipeline.models.classifier import Classifier
from pipeline.runinfo import write_usage
from pipeline.training import (
    CURVES_DIR, FitResult, checkpoint_dir_for, fit, plan_fit, publish_curves,
)


IMPRINT_MAX_PER_CLASS = 256  # class means for imprinting need a sample, not a whole large dataset


def _train_variant(cfg: Config, variant: str, backbone: dict, data: PreparedData, train, val
                   ) -> tuple[Classifier, dict, dict, FitResult]:
    """-> (module, what the output's summary says of it, what the run report says of it, the fit's result)."""
    ft = cfg.finetune
    image_shape = data.image_shape
    transfer = variant == "finetuned"
    fingerprint = (cfg.fingerprint("seed", "data", "trainer", "finetune") + backbone["sha256"][:8]
                   + data.manifest["data_version"][-6:])
    checkpoints = checkpoint_dir_for(cfg.paths.uri("checkpoints"), f"finetune-{variant}", fingerprint)
    plan = plan_fit(cfg, ft, train.samples, f"finetune:{variant}", checkpoints,
                    partly_frozen=transfer and ft.freeze_backbone_epochs > 0)
    torch.manual_seed(cfg.seed)  # the new head's (and scratch's) initial weights: same seed, same metrics
    module = Classifier(
        model=backbone["model"],
        image_shape=image_shape,
        num_classes=len(data.class_names),
        optimizer=ft.optimizer.model_dump(),
        schedule=ft.schedule.model_dump(),
        total_steps=plan.total_steps,
        lr=plan.lr,
        backbone_lr_ratio=ft.backbone_lr_ratio if transfer else 1.0,
        freeze_backbone_epochs=ft.freeze_backbone_epochs if transfer else 0,
        channels_last=cfg.trainer.channels_last,
        augment=ft.augment,
    )
    if transfer:
        module.backbone.load_state_dict(backbone["backbone"])
        if ft.head_init == "imprint":
            sample = train if isinstance(train, InMemorySplit) else \
                data.subset("train", per_class=IMPRINT_MAX_PER_CLASS, seed=cfg.seed)
            module.imprint_head(to_float(torch.as_tensor(sample.images)), torch.as_tensor(sample.labels))
    result = fit(module, train, val, plan)
    return module, {
        "steps": result.steps,
        "val_accuracy": result.val_accuracy,
    }, {  # the run report's part (pipeline/runinfo.py): how this computation went
        "resumed_from_step": result.resumed_from_step,
        "wall_time_s": result.wall_time_s,
        **result.usage(),  # device_hours, device_kind, step_time (per-rank medians, slowest rank), images_per_s
        "checkpoints": checkpoints,
    }, result


def run(cfg: Config) -> dict:
    data = load_prepared(cfg.paths.uri("prepared"))
    storage.require_complete(cfg.paths.uri("pretrain"), produced_by="pretrain")
    # Safetensors + JSON, never unpickled; "sha256" (of the file) ties resumable state to *this* backbone,
    # not to an earlier pretraining with equal params.
    backbone = load_backbone(storage.join(cfg.paths.uri("pretrain"), BACKBONE_FILE))
    budget = None if cfg.finetune.labels_per_class == "all" else cfg.finetune.labels_per_class
    # A label budget is a small sample held in memory; `all` streams the training split.
    train = data.subset("train", per_class=budget, seed=cfg.seed) if budget is not None else data.split("train")
    val = data.split("val")
    print(f"[finetune] {len(data.class_names)} classes: {train.samples} labelled training images "
          f"(labels_per_class={cfg.finetune.labels_per_class})")
    variants = ["finetuned", "scratch"] if cfg.finetune.train_scratch_baseline else ["finetuned"]
    trained = {v: _train_variant(cfg, v, backbone, data, train, val) for v in variants}
    summary = {  # summary.json in the output: a pure function of code, params and data
        "stage": "finetune",
        "data_version": data.manifest["data_version"],
        "classes": data.class_names,
        "labelled_images": train.samples,
        "labels_per_class": cfg.finetune.labels_per_class,
        **{v: info for v, (_, info, _, _) in trained.items()},
    }
    usage = {  # the run report: per variant, and in total
        **{v: run for v, (_, _, run, _) in trained.items()},
        "wall_time_s": round(sum(run["wall_time_s"] for _, _, run, _ in trained.values()), 3),
        "device_hours": round(sum(run["device_hours"] for _, _, run, _ in trained.values()), 6),
        "device_kind": trained["finetuned"][2]["device_kind"],
    }
    merged = {**summary, **usage, **{v: {**summary[v], **usage[v]} for v in trained}}
    if not trained["finetuned"][3].is_global_zero:
        return merged
    with storage.staged_output(cfg.paths.uri("finetune")) as out:
        for variant, (module, _, _, result) in trained.items():
            publish_curves(result, out / CURVES_DIR / variant)  # DVCLive's folder per variant: dvc.yaml `plots:`
            save_classifier(module, data.class_names, out / f"{variant}{BUNDLE_SUFFIX}", data.manifest.get("transform"))
        storage.write_json(str(out / "summary.json"), summary)
    write_usage(cfg, "finetune", usage)
    print("[finetune] done: " + ", ".join(f"{v} val/acc {info['val_accuracy']}" if info["val_accuracy"] is None
                                          else f"{v} val/acc {info['val_accuracy']:.4f}" for v, (_, info, _, _) in trained.items()))
    return merged
