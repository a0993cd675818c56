"""Each stage in process on tiny configs: outputs, lineage, determinism, data errors, ImageFolder + SimCLR."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from pipeline.config import Config
from pipeline.data.prepared import load_prepared
from pipeline.data.shards import read_shard
from pipeline.errors import DataError
from pipeline.model_card import with_run_report
from pipeline.models.bundle import load_backbone, load_classifier
from pipeline.models.classifier import Classifier
from pipeline.stages import STAGES, stage_runner
from tests.conftest import make_image_folder, read_json, run_stages, tiny_config



# ---------------------------------------------------------------- prepare


def _all_samples(prepared) -> dict[str, tuple[np.ndarray, int]]:
    """key -> (pixels, label) over every split's shards."""
    out = {}
    for split in ("train", "val", "test"):
        shards = prepared.split(split)
        for uri, count in zip(shards.uris, shards.counts):
            images, labels, keys = read_shard(uri, count)
            out.update({key: (image, int(label)) for key, image, label in zip(keys, images, labels)})
    return out


def test_prepare_writes_shards_and_manifest(tiny_run):
    root, cfg, results = tiny_run
    out = root / "data" / "prepared"
    assert sorted(p.name for p in out.iterdir()) == ["_COMPLETE", "manifest.json", "shards", "summary.json"]
    manifest = read_json(out / "manifest.json")
    prepared = load_prepared(str(out))
    samples = _all_samples(prepared)
    assert len(samples) == 1797 and next(iter(samples.values()))[0].shape == (8, 8, 1)
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert sum(manifest["class_counts"].values()) == 1797
    assert manifest["class_counts"]["0"] == sum(label == 0 for _, label in samples.values())
    assert manifest["split_counts"]["test"] == pytest.approx(0.25 * 1797, abs=10)
    assert {s: sum(e["samples"] for e in manifest["shards"][s]) for s in ("train", "val", "test")} \
        == manifest["split_counts"]
    assert manifest["data_version"].startswith("data-") and manifest["data_version"] == results["prepare"]["data_version"]
    assert manifest["image_shape"] == [8, 8, 1] and manifest["transform"]["image_size"] == 8
    files = manifest["files"]
    assert len(files) == 1797 and {f["split"] for f in files} == {"train", "val", "test"}
    # Per-file hashes are real content hashes of the source images (the digits need no resizing at 8 px).
    for index in (0, 500, 1796):
        pixels, label = samples[files[index]["key"]]
        assert files[index]["sha256"] == hashlib.sha256(pixels.tobytes()).hexdigest()
        assert files[index]["class"] == manifest["classes"][label]


def test_prepare_is_deterministic(tiny_run, tmp_path):
    root, _, _ = tiny_run
    cfg = tiny_config(tmp_path)
    stage_runner("prepare")(cfg)
    first, second = load_prepared(str(root / "data/prepared")), load_prepared(str(tmp_path / "data/prepared"))
    assert first.manifest == second.manifest
    shards = lambda d: {p.name: p.read_bytes() for p in (d / "data/prepared/shards").iterdir()}  # noqa: E731
    assert shards(root) == shards(tmp_path)  # byte-identical: DVC and the stage cache see no change


def test_prepare_split_depends_on_seed(tmp_path):
    stage_runner("prepare")(tiny_config(tmp_path / "a", "seed=1"))
    stage_runner("prepare")(tiny_config(tmp_path / "b", "seed=2"))
    a, b = load_prepared(str(tmp_path / "a/data/prepared")), load_prepared(str(tmp_path / "b/data/prepared"))
    assert a.manifest["data_version"] == b.manifest["data_version"]  # same content, same version
    assert [f["split"] for f in a.manifest["files"]] != [f["split"] for f in b.manifest["files"]]


# ---------------------------------------------------------------- pretrain / finetune


def test_pretrain_trains_the_configured_steps(tiny_run):
    root, cfg, results = tiny_run
    out = root / "models" / "pretrain"
    assert (out / "_COMPLETE").exists()
    summary = read_json(out / "summary.json")
    corpus = read_json(root / "data/corpus/manifest.json")
    train_images = corpus["split_counts"]["train"]
    assert train_images == 10 * cfg.pretrain.glyphs_per_class * 9 // 10  # a tenth of the glyphs is held out
    expected = cfg.pretrain.epochs * cfg.pretrain.steps_per_epoch(train_images, 1)
    assert summary["steps"] == expected == results["pretrain"]["steps"]
    assert summary["world_size"] == 1 and "resumed_from_step" not in summary  # a run fact: the run report's
    assert read_json(root / "reports/usage/pretrain.json")["resumed_from_step"] == 0 == results["pretrain"]["resumed_from_step"]
    assert 0.0 <= summary["best_val_accuracy"] <= 1.0
    backbone = load_backbone(str(out / "backbone.safetensors"))
    assert backbone["image_shape"] == [1, 8, 8]
    assert backbone["corpus_version"] == corpus["data_version"] == summary["corpus_version"]
    assert corpus["data_version"].startswith("corpus-") and corpus["source"] == "builtin:glyphs"
    assert any(key.endswith("weight") for key in backbone["backbone"])


def test_finetune_trains_both_variants_on_the_label_budget(tiny_run):
    root, cfg, _ = tiny_run
    out = root / "models" / "finetune"
    summary = read_json(out / "summary.json")
    assert summary["labelled_images"] == 10 * cfg.finetune.labels_per_class
    expected = cfg.finetune.epochs * cfg.finetune.steps_per_epoch(summary["labelled_images"], 1)
    for variant in ("finetuned", "scratch"):
        assert summary[variant]["steps"] == expected
        assert 0.0 <= summary[variant]["val_accuracy"] <= 1.0
        module, classes = load_classifier(str(out / f"{variant}.safetensors"))
        assert classes == [str(d) for d in range(10)]
        assert module(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_finetune_starts_from_the_pretrained_backbone(tiny_run):
    root, _, _ = tiny_run
    pretrained = load_backbone(str(root / "models/pretrain/backbone.safetensors"))["backbone"]
    finetuned, _ = load_classifier(str(root / "models/finetune/finetuned.safetensors"))
    scratch, _ = load_classifier(str(root / "models/finetune/scratch.safetensors"))
    name = next(k for k in pretrained if k.endswith("weight") and pretrained[k].ndim == 4)
    tuned = finetuned.backbone.state_dict()[name]
    # Unfrozen at a low lr for one epoch: moved, but much closer to the pretrained weights than scratch is.
    assert (tuned - pretrained[name]).norm() < (scratch.backbone.state_dict()[name] - pretrained[name]).norm()


def test_backbone_frozen_for_the_first_epochs():
    module = Classifier(model={"width": 4, "depth": 1}, image_shape=(1, 8, 8), num_classes=3, optimizer={},
                        schedule={}, total_steps=10, lr=0.01, freeze_backbone_epochs=1)
    module.train()
    module.on_train_epoch_start()  # epoch 0 < 1: frozen, BatchNorm statistics kept
    assert not any(p.requires_grad for p in module.backbone.parameters())
    assert not module.backbone.training and module.head.training
    assert all(p.requires_grad for p in module.head.parameters())
    unfrozen = Classifier(**{**module.hparams, "freeze_backbone_epochs": 0})
    unfrozen.train()
    unfrozen.on_train_epoch_start()
    assert all(p.requires_grad for p in unfrozen.backbone.parameters()) and unfrozen.backbone.training


# ---------------------------------------------------------------- evaluate: metrics and model card


def test_metricsread_json(tiny_run):
    root, cfg, results = tiny_run
    metrics = read_json(root / "reports" / "metrics.json")
    assert metrics == results["evaluate"]["metrics"]
    accuracy, scratch = metrics["test"]["accuracy"], metrics["scratch"]["test"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0 and 0.0 <= scratch <= 1.0
    assert metrics["transfer_gain"] == pytest.approx(accuracy - scratch, abs=1e-6)
    assert set(metrics["per_class"]) == {str(d) for d in range(10)}
    for stats in metrics["per_class"].values():
        assert 0.0 <= stats["precision"] <= 1.0 and 0.0 <= stats["recall"] <= 1.0
    test_size = read_json(root / "data/prepared/manifest.json")["split_counts"]["test"]
    assert sum(s["support"] for s in metrics["per_class"].values()) == test_size
    # Recall weighted by support is the accuracy: the per-class numbers belong to the same predictions.
    weighted = sum(s["recall"] * s["support"] for s in metrics["per_class"].values()) / test_size
    assert weighted == pytest.approx(accuracy, abs=1e-4)
    confusion = (root / "reports" / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == test_size + 1
    hits = sum(a == p for a, p in (line.split(",") for line in confusion[1:]))
    assert hits / test_size == pytest.approx(accuracy, abs=1e-4)


def test_model_card_records_lineage(tiny_run):
    root, cfg, _ = tiny_run
    release = root / "models" / "release"
    assert (release / "_COMPLETE").exists() and (release / "finetuned.safetensors").exists()
    card = read_json(release / "model_card.json")
    assert card["data_version"] == read_json(root / "data/prepared/manifest.json")["data_version"]
    assert card["params"] == cfg.model_dump(mode="json", exclude={"paths"})  # where a run writes: not lineage
    assert card["metrics"] == read_json(root / "reports/metrics.json")
    # Run facts are the run report's (not in the release: recomputing it gives the same bytes); merged, the card
    # shows them (what promotion keeps in the registry).
    assert not {"git_commit", "wall_time_s", "hardware", "created_at"} & set(card)
    report = read_json(root / "reports/usage/evaluate.json")
    merged = with_run_report(card, report)
    assert "git_commit" in merged and merged["created_at"]
    assert set(merged["wall_time_s"]) == set(STAGES)
    assert all(isinstance(t, (int, float)) and t >= 0 for t in merged["wall_time_s"].values())
    assert merged["hardware"]["torch"] == torch.__version__ and merged["hardware"]["python"]
    assert card["task"]["labels_per_class"] == cfg.finetune.labels_per_class
    module, classes = load_classifier(str(release / "finetuned.safetensors"))
    assert len(classes) == 10


def test_same_seed_same_metrics(tiny_run, tmp_path):
    root, _, _ = tiny_run
    run_stages(tiny_config(tmp_path))
    first, second = read_json(root / "reports/metrics.json"), read_json(tmp_path / "reports/metrics.json")
    assert first == second
    assert (read_json(root / "models/pretrain/summary.json")["best_val_accuracy"]
            == read_json(tmp_path / "models/pretrain/summary.json")["best_val_accuracy"])


def test_rerun_of_a_finished_stage_resumes_at_the_end(tmp_path, capsys):
    """`dvc repro -f` or a flow retry re-runs a finished stage: its last checkpoint is already at the end."""
    cfg = tiny_config(tmp_path, "pretrain.checkpoint_every_n_steps=1", "finetune.checkpoint_every_n_steps=1",
                      "finetune.train_scratch_baseline=false")
    run_stages(cfg, "prepare", "corpus", "pretrain", "finetune")
    first = read_json(tmp_path / "models/pretrain/summary.json")
    capsys.readouterr()
    again = run_stages(cfg, "pretrain", "finetune")
    out = capsys.readouterr().out
    assert f"at step {first['steps']}" in out
    assert again["pretrain"]["steps"] == first["steps"] == again["pretrain"]["resumed_from_step"]
    assert again["finetune"]["finetuned"]["resumed_from_step"] == again["finetune"]["finetuned"]["steps"]
    assert (tmp_path / "models/finetune/_COMPLETE").exists()


# ---------------------------------------------------------------- stage order and bad data


def test_stage_refuses_missing_upstream_output(tmp_path):
    with pytest.raises(DataError) as err:
        stage_runner("finetune")(tiny_config(tmp_path))
    assert str(tmp_path / "data" / "prepared") in err.value.render() and "pipeline prepare" in err.value.render()
    (tmp_path / "data" / "prepared").mkdir(parents=True)  # a half-written output without _COMPLETE
    with pytest.raises(DataError, match="_COMPLETE"):
        stage_runner("pretrain")(tiny_config(tmp_path))


def test_bad_data_never_replaces_the_previous_prepared_output(tmp_path):
    source = make_image_folder(tmp_path / "images", classes=3, per_class=10)
    cfg = tiny_config(tmp_path / "run", f"data.source={source}")
    stage_runner("prepare")(cfg)
    prepared = tmp_path / "run" / "data" / "prepared"
    before = {str(p): p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    (source / "digit1" / "004.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="digit1/004.png"):
        stage_runner("prepare")(cfg)
    assert {str(p): p.read_bytes() for p in prepared.rglob("*") if p.is_file()} == before
    assert [p.name for p in prepared.parent.iterdir()] == ["prepared"]  # no staging folder left behind


def test_too_few_images_in_a_class_named(tmp_path):
    source = make_image_folder(tmp_path / "images", classes=3, per_class=10)
    for extra in sorted((source / "digit2").iterdir())[2:]:
        extra.unlink()
    with pytest.raises(DataError, match="digit2: 2 image"):
        stage_runner("prepare")(tiny_config(tmp_path / "run", f"data.source={source}"))
    assert not (tmp_path / "run" / "data" / "prepared").exists()


# ---------------------------------------------------------------- ImageFolder source, self-supervised pretraining


def test_image_folder_source_with_simclr_end_to_end(tmp_path):
    source = make_image_folder(tmp_path / "images", classes=3, per_class=10)
    cfg: Config = tiny_config(tmp_path / "run", f"data.source={source}", "pretrain.objective=simclr",
                              f"pretrain.source={source}",
                              "pretrain.epochs=2", "finetune.labels_per_class=3")
    results = run_stages(cfg)
    manifest = read_json(tmp_path / "run/data/prepared/manifest.json")
    assert manifest["classes"] == ["digit0", "digit1", "digit2"]
    assert manifest["class_counts"] == {"digit0": 10, "digit1": 10, "digit2": 10}
    assert manifest["source"] == str(source)
    stored = {f["path"]: f["sha256"] for f in manifest["files"]}
    png = source / "digit1" / "003.png"
    assert stored[str(png)] == hashlib.sha256(png.read_bytes()).hexdigest()
    assert results["pretrain"]["objective"] == "simclr" and results["pretrain"]["steps"] >= 2
    metrics = read_json(tmp_path / "run/reports/metrics.json")
    assert set(metrics["per_class"]) == {"digit0", "digit1", "digit2"}
    assert "transfer_gain" in metrics
    card = read_json(tmp_path / "run/models/release/model_card.json")
    assert card["data_source"] == str(source) and card["task"]["pretraining"] == f"simclr on {source}"
    assert card["corpus_version"].startswith("corpus-") and card["corpus_source"] == str(source)
