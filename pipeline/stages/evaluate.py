"""Stage 4: test-set metrics of the fine-tuned and the scratch model; release bundle + model card.

Writes `reports/metrics.json` (DVC metrics: test.accuracy, scratch.test.accuracy,
transfer_gain, per-class precision/recall), `reports/confusion.csv` (DVC confusion plot)
and `models/release/` (the model, and its model card: the lineage users read later; the training
curves as `curves.json` and `curves.png`, pipeline/curves.py). All of them are pure functions of code,
params and data; the run's timings, device-hours, hardware, commit and date go to its run report,
`reports/usage/evaluate.json` (pipeline/runinfo.py), which promotion merges into the registry's card.

    python -m pipeline evaluate
"""
from __future__ import annotations

import csv
import io
import time

import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_fscore_support

from pipeline import storage
from pipeline.config import Config
from pipeline.data.prepared import load_prepared
from pipeline.data.shards import SplitShards
from pipeline.curves import CURVES_JSON, CURVES_PNG, read_curves, render_png, run_dirs
from pipeline.data.stream import InMemorySplit, ShardStream
from pipeline.model_card import CARD_MARKDOWN, with_run_report, write_markdown
from pipeline.models.bundle import load_classifier
from pipeline.models.files import CLASSIFIER_FILE, SCRATCH_FILE
from pipeline.runinfo import git_commit, hardware, read_usage, usage_uri, write_usage


def predictions(module, data: SplitShards | InMemorySplit, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a whole split, streamed shard by shard: memory holds logits, not images."""
    batches = ShardStream(data, batch_size, seed=0, shuffle=False, rank_world=(0, 1))
    logits, labels = [], []
    for images, batch_labels in batches:
        logits.append(module.predict_logits(images, batch_size))
        labels.append(batch_labels)
    return torch.cat(logits), torch.cat(labels)


def score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
    predicted = logits.argmax(dim=1)
    return {
        "accuracy": round(float((predicted == labels).float().mean()), 6),
        "loss": round(float(F.cross_entropy(logits, labels)), 6),
    }, predicted


def score_model(model_uri: str, prepared_uri: str, batch_size: int) -> dict:
    """A released model on a prepared dataset's test split -> {classes, data_classes, accuracy}; accuracy is None
    when the model's classes are not the data's (not comparable). `pipeline score` runs it for the promotion gate,
    which re-scores the champion on this run's test set in a process of its own: the flow imports no torch."""
    data = load_prepared(prepared_uri)
    model, classes = load_classifier(model_uri)
    accuracy = score(*predictions(model, data.split("test"), batch_size))[0]["accuracy"] \
        if classes == data.class_names else None
    return {"classes": classes, "data_classes": data.class_names, "accuracy": accuracy}


def per_class(labels: torch.Tensor, predicted: torch.Tensor, classes: list[str]) -> dict:
    precision, recall, _, support = precision_recall_fscore_support(
        labels.numpy(), predicted.numpy(), labels=list(range(len(classes))), zero_division=0
    )
    return {c: {"precision": round(float(p), 6), "recall": round(float(r), 6), "support": int(s)}
            for c, p, r, s in zip(classes, precision, recall, support)}


def confusion_rows(labels: torch.Tensor, predicted: torch.Tensor, classes: list[str]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[a], classes[p]) for a, p in zip(labels.tolist(), predicted.tolist()))
    return out.getvalue().encode()


STAGE_OUTPUTS = ("prepare", "corpus", "pretrain", "finetune")


def stage_times(cfg: Config) -> dict:
    """Wall time of each earlier stage from its run report (pipeline/runinfo.py); None where it has none."""
    times = {}
    for stage in STAGE_OUTPUTS:
        report = read_usage(cfg, stage)
        times[stage] = report.get("wall_time_s") if report else None
    return times


def stage_usage(cfg: Config, evaluate_s: float) -> tuple[dict, dict]:
    """(device-hours per stage and per device kind in total, step-time reports per training run) from the
    stages' run reports. A stage without one (restored from a cache: it computed nothing) is left out."""
    stages, step_time = {}, {}
    for stage in STAGE_OUTPUTS:
        report = read_usage(cfg, stage)
        if not report:
            continue
        hours = report.get("device_hours", report.get("wall_time_s", 0.0) / 3600)
        stages[stage] = {"hours": round(hours, 6), "kind": report.get("device_kind", "cpu")}
        runs = {stage: report} if stage == "pretrain" else \
            {f"{stage}/{v}": report[v] for v in ("finetuned", "scratch") if isinstance(report.get(v), dict)}
        step_time.update({run: info["step_time"] for run, info in runs.items() if info.get("step_time")})
    stages["evaluate"] = {"hours": round(evaluate_s / 3600, 6), "kind": "cpu"}
    total: dict[str, float] = {}
    for usage in stages.values():
        total[usage["kind"]] = round(total.get(usage["kind"], 0.0) + usage["hours"], 6)
    return {"stages": stages, "total": total}, step_time


def run(cfg: Config) -> dict:
    started = time.perf_counter()
    data = load_prepared(cfg.paths.uri("prepared"))
    finetune_uri = cfg.paths.uri("finetune")
    storage.require_complete(finetune_uri, produced_by="finetune")
    test = data.split("test")
    finetuned, classes = load_classifier(storage.join(finetune_uri, CLASSIFIER_FILE))
    logits, labels = predictions(finetuned, test, cfg.evaluate.batch_size)
    metrics_test, predicted = score(logits, labels)
    pretrained = storage.read_json(storage.join(cfg.paths.uri("pretrain"), "summary.json"))
    metrics: dict = {
        "data_version": data.manifest["data_version"],
        "corpus_version": pretrained.get("corpus_version"),
        "labels_per_class": cfg.finetune.labels_per_class,
        "test": metrics_test,
        "per_class": per_class(labels, predicted, classes),
    }
    scratch_uri = storage.join(finetune_uri, SCRATCH_FILE)
    if storage.exists(scratch_uri):
        scratch, _ = load_classifier(scratch_uri)
        metrics["scratch"] = {"test": score(*predictions(scratch, test, cfg.evaluate.batch_size))[0]}
        metrics["transfer_gain"] = round(metrics_test["accuracy"] - metrics["scratch"]["test"]["accuracy"], 6)
    curves = read_curves(run_dirs(cfg.paths.uri("pretrain"), finetune_uri))  # pipeline/curves.py
    # The card in the release is a pure function of code, params and data (byte-identical when recomputed):
    # no paths (where a run writes), no timings, hardware, commit or date. Those are the run report's
    # (RUN_FIELDS), which promotion merges into the registry's copy (model_card.with_run_report).
    card = {
        "model": CLASSIFIER_FILE,
        "task": {"classes": classes, "pretraining": f"{cfg.pretrain.objective} on {pretrained.get('corpus_source')}",
                 "labels_per_class": cfg.finetune.labels_per_class},
        "data_version": data.manifest["data_version"],
        "data_source": data.manifest["source"],
        "corpus_version": pretrained.get("corpus_version"),
        "corpus_source": pretrained.get("corpus_source"),
        "image_transform": data.manifest.get("transform"),
        "params": cfg.model_dump(mode="json", exclude={"paths"}),
        "metrics": metrics,
        **({"curves": CURVES_PNG} if curves else {}),
    }
    with storage.staged_output(cfg.paths.uri("release")) as out:
        # The release is self-contained: promotion and serving never reach back into finetune's output.
        (out / CLASSIFIER_FILE).write_bytes(storage.read_bytes(storage.join(finetune_uri, CLASSIFIER_FILE)))
        if curves:  # the training curves: data for the flow's artifact, a picture for the card
            storage.write_json(str(out / CURVES_JSON), curves)
            render_png(curves, out / CURVES_PNG)
        storage.write_json(str(out / "model_card.json"), card)
        write_markdown(card, out / CARD_MARKDOWN)  # the same card, for people: what, data, metrics, lineage
    reports = cfg.paths.uri("reports")
    storage.write_bytes(storage.join(reports, "confusion.csv"), confusion_rows(labels, predicted, classes))
    storage.write_json(storage.join(reports, "metrics.json"), metrics)  # last: metrics mean "evaluation finished"
    times = stage_times(cfg)
    times["evaluate"] = round(time.perf_counter() - started, 3)
    device_hours, step_time = stage_usage(cfg, times["evaluate"])
    report = write_usage(cfg, "evaluate", {
        "wall_time_s": times,  # per stage; None: restored from a cache in this workspace (nothing computed)
        "device_hours": device_hours,  # per stage {hours, kind}, and in total per device kind (gpu/cpu)
        "step_time": step_time,  # per training run: per-rank median step times, the slowest rank and its ratio
        "hardware": hardware(),
        "git_commit": git_commit(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    gain = metrics.get("transfer_gain")
    print(f"[evaluate] test/acc {metrics_test['accuracy']:.4f}"
          + (f", scratch {metrics['scratch']['test']['accuracy']:.4f}, transfer_gain {gain:+.4f}" if gain is not None else ""))
    return {"stage": "evaluate", "metrics": metrics, "release": cfg.paths.uri("release"), "wall_time_s": times["evaluate"],
            "run_report": usage_uri(cfg, "evaluate"), "card": with_run_report(card, report)}
