"""Stage: the pretraining corpus (`pretrain.source`) as shards + manifest, like `prepare` for the target.

    python -m pipeline corpus                                              # builtin:glyphs
    python -m pipeline corpus --set pretrain.source=/data/unlabelled --set pretrain.objective=simclr

Separate from `prepare` so each is versioned and cached on its own: new target images never re-run
pretraining. Images get the target's transform (`data.image_size`, `data.channels`): the backbone
sees during pretraining what it sees when fine-tuned. With `data.image_size: auto` that side is the
target source's own (its images are scanned, not decoded), so `data.source` and `data.version` are params
of this stage too; a corpus whose images are all smaller than that side is an error. Splits: train and val (`pretrain.val_fraction`),
stratified when the corpus is labelled.
"""
from __future__ import annotations

from pipeline.config import Config
from pipeline.data.ingest import holdout_split, ingest
from pipeline.data.sources import check_corpus_size, scan_source, target_image_size
from pipeline.errors import DataError


def run(cfg: Config) -> dict:
    pretrain = cfg.pretrain
    size = target_image_size(cfg)  # the target's side (`auto`: its images' own), shared by the corpus
    scan = scan_source(pretrain.source, "corpus", cfg, image_size=size)
    problem = check_corpus_size(scan, size)
    if problem:  # before any decoding: nothing is written
        raise DataError([*scan.problems, problem])
    if pretrain.objective == "supervised" and not scan.labelled and scan.items:
        # Before any decoding: nothing about this corpus can make the objective work.
        raise DataError(f"pretrain.source {pretrain.source}: unlabelled images; pretrain.objective=supervised "
                        "needs a labelled corpus (ImageFolder or builtin:glyphs); use simclr for unlabelled images")
    return ingest(cfg, scan, stage="corpus", out_uri=cfg.paths.uri("corpus"), splits=("train", "val"), image_size=size,
                  pin_key="pretrain.version", pin=pretrain.version,
                  assign=lambda labels: holdout_split(labels, pretrain.val_fraction, cfg.seed, stratify=scan.labelled))
