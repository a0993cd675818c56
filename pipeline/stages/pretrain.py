"""Stage 2: pretrain the backbone on a *source task* whose labels the target never uses.

Two source tasks (`pretrain.objective`):
- `glyphs` (default): supervised classification of synthetic printed digits rendered at
  the target's image size (pipeline/data/glyphs.py). Sim-to-real transfer.
- `simclr`: self-supervised contrastive learning on the target's *unlabelled* training
  images; works for any ImageFolder data.
Either way the target's label budget is the only supervision from the target data, so
the transfer gain evaluation reports is honest. Resumes from its last checkpoint when
re-run after an interruption (e.g. pod preemption).

    python -m pipeline pretrain
    python -m pipeline pretrain --set pretrain.epochs=3 --set trainer.precision=bf16-mixed
"""
from __future__ import annotations

import io

import torch

from pipeline import storage
from pipeline.config import Config
from pipeline.data.prepared import load_prepared
from pipeline.data.glyphs import GLYPHS, render_glyphs
from pipeline.data.tasks import TaskArrays, to_tensor
from pipeline.models.classifier import Classifier
from pipeline.models.contrastive import ContrastivePretrainer
from pipeline.optim import effective_lr
from pipeline.training import checkpoint_dir_for, fit, steps_per_epoch, world_size


def source_task(cfg: Config, data) -> tuple[TaskArrays, TaskArrays]:
    if cfg.pretrain.objective == "simclr":
        return data.subset("train"), data.subset("val")  # labels are in the arrays but never read
    images, labels = render_glyphs(cfg.pretrain.glyphs_per_class, data.image_shape, cfg.seed)
    held_out = len(labels) // 10
    classes = list(GLYPHS)
    return (TaskArrays(to_tensor(images[held_out:]), torch.from_numpy(labels[held_out:]), classes),
            TaskArrays(to_tensor(images[:held_out]), torch.from_numpy(labels[:held_out]), classes))


def run(cfg: Config) -> dict:
    data = load_prepared(cfg.paths.uri("prepared"))
    train, val = source_task(cfg, data)
    world = world_size(cfg.trainer)
    total_steps = cfg.pretrain.epochs * steps_per_epoch(len(train.labels), cfg.pretrain, world)
    global_batch = cfg.pretrain.batch_size * cfg.pretrain.accumulate_grad_batches * world
    common = dict(
        model=cfg.pretrain.model.model_dump(),
        image_shape=data.image_shape,
        optimizer=cfg.pretrain.optimizer.model_dump(),
        schedule=cfg.pretrain.schedule.model_dump(),
        total_steps=total_steps,
        lr=effective_lr(cfg.pretrain.optimizer, global_batch),
        channels_last=cfg.trainer.channels_last,
    )
    torch.manual_seed(cfg.seed)  # initial weights too: the same seed must give the same metrics
    if cfg.pretrain.objective == "simclr":
        module = ContrastivePretrainer(**common, temperature=cfg.pretrain.temperature,
                                       projection_dim=cfg.pretrain.projection_dim)
    else:
        module = Classifier(**common, num_classes=len(train.classes), augment=True)
    fingerprint = cfg.fingerprint("seed", "data", "trainer", "pretrain") + data.manifest["data_version"][-6:]
    checkpoints = checkpoint_dir_for(cfg.paths.uri("checkpoints"), "pretrain", fingerprint)
    result = fit(module, train, val, cfg.pretrain, cfg.trainer, checkpoints, total_steps,
                 label="pretrain", seed=cfg.seed, monitor_best=True)
    summary = {
        "stage": "pretrain",
        "objective": cfg.pretrain.objective,
        "data_version": data.manifest["data_version"],
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "world_size": world,
        "global_batch": global_batch,
        "best_val_accuracy": result.best_score,  # simclr: label-free pair-retrieval accuracy
        "wall_time_s": result.wall_time_s,
        "checkpoints": checkpoints,
    }
    if not result.is_global_zero:
        return summary  # rank 0 alone publishes outputs
    if result.best_path:
        state = torch.load(io.BytesIO(storage.read_bytes(result.best_path)), map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
    with storage.staged_output(cfg.paths.uri("pretrain")) as out:
        torch.save({
            "backbone": module.backbone.state_dict(),
            "model": cfg.pretrain.model.model_dump(),
            "image_shape": list(data.image_shape),
            "data_version": data.manifest["data_version"],
        }, out / "backbone.pt")
        storage.write_json(str(out / "summary.json"), summary)
    best = "n/a (resumed at the end: nothing left to validate)" if result.best_score is None else f"{result.best_score:.4f}"
    print(f"[pretrain] done: {result.steps} steps, best source val/acc {best}")
    return summary
