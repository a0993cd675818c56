"""Stage 2: pretrain the backbone on its own corpus (`pretrain.source`), never on the target's labels.

The corpus is prepared, versioned and cached on its own by the `corpus` stage, so a change of the
target data never re-runs this stage. Two objectives (`pretrain.objective`):
- `supervised` (default): classify the corpus's own labels: `builtin:glyphs`, synthetic printed
  digits (the demo: sim-to-real transfer), or any labelled ImageFolder.
- `simclr`: self-supervised contrastive learning; labels ignored, so any folder of images works.
Either way the target's label budget is the only supervision from the target data, so the transfer
gain evaluation reports is honest. Resumes from its last checkpoint when re-run after an
interruption (e.g. pod preemption), at the exact batch it had reached.

    python -m pipeline pretrain
    python -m pipeline pretrain --set pretrain.epochs=3 --set trainer.precision=bf16-mixed
"""
from __future__ import annotations

import io

import torch

from pipeline import storage
from pipeline.config import Config
from pipeline.data.prepared import load_prepared
from pipeline.errors import DataError
from pipeline.models.bundle import save_backbone
from pipeline.models.files import BACKBONE_FILE
from pipeline.models.classifier import Classifier
from pipeline.models.contrastive import ContrastivePretrainer
from pipeline.runinfo import write_usage
from pipeline.training import CURVES_DIR, checkpoint_dir_for, fit, plan_fit, publish_curves


def run(cfg: Config) -> dict:
    corpus = load_prepared(cfg.paths.uri("corpus"), produced_by="corpus")
    if cfg.pretrain.objective == "supervised" and not corpus.class_names:
        raise DataError(f"pretrain.source {corpus.manifest['source']}: unlabelled images; "
                        "pretrain.objective=supervised needs class folders (use simclr)")
    train, val = corpus.split("train"), corpus.split("val")
    # Resumable state belongs to this corpus content at this image shape; the target data plays no part.
    shape = "x".join(map(str, corpus.image_shape))
    fingerprint = cfg.fingerprint("seed", "trainer", "pretrain") + f"-{shape}-" + corpus.manifest["data_version"][-6:]
    checkpoints = checkpoint_dir_for(cfg.paths.uri("checkpoints"), "pretrain", fingerprint)
    plan = plan_fit(cfg, cfg.pretrain, train.samples, "pretrain", checkpoints, monitor_best=True)
    common = dict(
        model=cfg.pretrain.model.model_dump(),
        image_shape=corpus.image_shape,
        optimizer=cfg.pretrain.optimizer.model_dump(),
        schedule=cfg.pretrain.schedule.model_dump(),
        total_steps=plan.total_steps,
        lr=plan.lr,
        channels_last=cfg.trainer.channels_last,
    )
    torch.manual_seed(cfg.seed)  # initial weights too: the same seed must give the same metrics
    if cfg.pretrain.objective == "simclr":
        module = ContrastivePretrainer(**common, temperature=cfg.pretrain.temperature,
                                       projection_dim=cfg.pretrain.projection_dim)
    else:
        module = Classifier(**common, num_classes=len(corpus.class_names), augment=True)
    result = fit(module, train, val, plan)
    summary = {  # summary.json in the output: a pure function of code, params and data
        "stage": "pretrain",
        "objective": cfg.pretrain.objective,
        "corpus_version": corpus.manifest["data_version"],
        "corpus_source": corpus.manifest["source"],
        "steps": result.steps,
        "world_size": cfg.trainer.world_size,
        "global_batch": cfg.pretrain.global_batch(cfg.trainer.world_size),
        "best_val_accuracy": result.best_score,  # simclr: label-free pair-retrieval accuracy
    }
    usage = {  # the run report (pipeline/runinfo.py): how this computation went
        "resumed_from_step": result.resumed_from_step,
        "wall_time_s": result.wall_time_s,
        **result.usage(),  # device_hours, device_kind, step_time (per-rank medians, slowest rank), images_per_s
        "checkpoints": checkpoints,
    }
    if not result.is_global_zero:
        return {**summary, **usage}  # rank 0 alone publishes outputs
    if result.best_path:
        state = torch.load(io.BytesIO(storage.read_bytes(result.best_path)), map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
    with storage.staged_output(cfg.paths.uri("pretrain")) as out:
        save_backbone(module.backbone, {
            "model": cfg.pretrain.model.model_dump(mode="json"),
            "image_shape": list(corpus.image_shape),
            "corpus_version": corpus.manifest["data_version"],
        }, out / BACKBONE_FILE)
        storage.write_json(str(out / "summary.json"), summary)
        publish_curves(result, out / CURVES_DIR)  # DVCLive's folder: dvc.yaml `plots:`, pipeline/curves.py
    write_usage(cfg, "pretrain", usage)
    best = "n/a (resumed at the end: nothing left to validate)" if result.best_score is None else f"{result.best_score:.4f}"
    print(f"[pretrain] done: {result.steps} steps, best source val/acc {best}")
    return {**summary, **usage}
