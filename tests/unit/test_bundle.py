"""Model files: safetensors + JSON header round-trip; anything corrupt or tampered is a DataError naming the file,
and nothing in the file is ever executed. The Markdown model card renders from the card dict."""
from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from pipeline.errors import DataError
from pipeline.model_card import render_markdown
from pipeline.models.bundle import (
    BACKBONE_FORMAT, CLASSIFIER_FORMAT, load_backbone, load_bundle, load_classifier, save_backbone, save_classifier,
)
from pipeline.models.classifier import Classifier

CLASSES = ["cat", "dog", "fox"]
TRANSFORM = {"image_size": 8, "channels": 1, "resize": "shorter side, centre crop", "exif_transpose": True}


def _module(**model) -> Classifier:
    torch.manual_seed(0)
    return Classifier(model={"width": 4, "depth": 1, **model}, image_shape=(1, 8, 8), num_classes=3, optimizer={},
                      schedule={}, total_steps=10, lr=0.01)


@pytest.fixture
def saved(tmp_path) -> tuple[Classifier, Path]:
    module = _module()
    path = tmp_path / "finetuned.safetensors"
    save_classifier(module, CLASSES, path, TRANSFORM)
    return module, path


def _parts(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(this pipeline's metadata object, tensors), read with safetensors itself."""
    from safetensors.torch import load

    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(json.loads(data[8:8 + length])["__metadata__"]["pipeline"]), load(data)


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], info: dict | str, header: dict | None = None) -> None:
    """Re-save as a careful attacker would: valid safetensors, checksum recomputed."""
    import hashlib

    from safetensors.torch import save

    data = save(tensors)
    (length,) = struct.unpack("<Q", data[:8])
    if isinstance(info, dict):
        info = json.dumps({**info, **({"header": header} if header is not None else {}),
                           "tensors_sha256": hashlib.sha256(data[8 + length:]).hexdigest()})
    path.write_bytes(save(tensors, metadata={"pipeline": info}))


# ---------------------------------------------------------------- round trip


def test_classifier_round_trips_with_classes_and_transform(saved):
    module, path = saved
    bundle = load_bundle(str(path))
    assert bundle.classes == CLASSES and bundle.transform == {"image_size": 8, "channels": 1}
    assert bundle.header["image_shape"] == [1, 8, 8] and bundle.header["transform"]["image_size"] == 8
    assert not bundle.module.training
    loaded = bundle.module.state_dict()
    assert loaded.keys() == module.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in module.state_dict().items())
    images = torch.randn(5, 1, 8, 8)
    assert torch.equal(bundle.module.predict_logits(images), module.predict_logits(images))
    again, classes = load_classifier(str(path))
    assert classes == CLASSES and isinstance(again, Classifier)
    metadata, _ = _parts(path)
    assert metadata["format"] == CLASSIFIER_FORMAT and metadata["format_version"] == 1
    save_classifier(module, CLASSES, path.with_name("again.safetensors"), TRANSFORM)
    assert path.with_name("again.safetensors").read_bytes() == path.read_bytes()  # same model, same bytes


@pytest.mark.parametrize("model, shape", [({"arch": "resnet", "width": 4, "blocks": [1, 1]}, (3, 16, 16)),
                                          ({"arch": "vit", "width": 16, "depth": 1, "heads": 2, "patch_size": 4},
                                           (3, 16, 16))])
def test_every_architecture_round_trips(tmp_path, model, shape):
    module = Classifier(model=model, image_shape=shape, num_classes=2, optimizer={}, schedule={}, total_steps=1, lr=0.1)
    save_classifier(module, ["a", "b"], tmp_path / "m.safetensors")
    bundle = load_bundle(str(tmp_path / "m.safetensors"))
    assert bundle.transform == {"image_size": 16, "channels": 3}  # none recorded: the input shape's
    images = torch.randn(2, *shape)
    assert torch.equal(bundle.module.predict_logits(images), module.predict_logits(images))


def test_backbone_round_trips_with_its_sha256(tmp_path):
    module = _module()
    path = tmp_path / "backbone.safetensors"
    save_backbone(module.backbone, {"model": {"width": 4, "depth": 1}, "image_shape": [1, 8, 8],
                                    "corpus_version": "corpus-1"}, path)
    loaded = load_backbone(str(path))
    assert loaded["model"] == {"width": 4, "depth": 1} and loaded["corpus_version"] == "corpus-1"
    import hashlib

    assert loaded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(torch.equal(loaded["backbone"][k], v) for k, v in module.backbone.state_dict().items())
    assert _parts(path)[0]["format"] == BACKBONE_FORMAT
    with pytest.raises(DataError, match="expected 'pipeline.classifier'"):
        load_bundle(str(path))  # a backbone is not a classifier


# ---------------------------------------------------------------- never unpickled, every defect named


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_renamed_to_safetensors_is_refused_and_never_run(tmp_path, writer):
    marker = tmp_path / "executed"
    path = tmp_path / "finetuned.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    else:
        torch.save({"hparams": {}, "state_dict": _Payload(marker)}, path)
    with pytest.raises(DataError, match="not a safetensors model file") as err:
        load_bundle(str(path))
    assert str(path) in err.value.render()
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is real: unpickling it does run it
    assert marker.exists()


def test_flipped_bytes_are_caught(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a weight: safetensors alone would load it
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match the checksum"):
        load_bundle(str(path))
    data[-3] ^= 0xFF
    data[20] ^= 0x55  # the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=str(path)):
        load_bundle(str(path))


def test_truncated_empty_and_missing_files(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(DataError, match=str(path)):
        load_bundle(str(path))
    path.write_bytes(b"")
    with pytest.raises(DataError, match="not a safetensors model file"):
        load_bundle(str(path))
    with pytest.raises(DataError, match="nope.safetensors: not found"):
        load_bundle(str(tmp_path / "nope.safetensors"))


def test_wrong_metadata_and_tensors_are_named(saved):
    _, path = saved
    metadata, tensors = _parts(path)
    header = metadata["header"]

    _rewrite(path, tensors, "{not json")
    with pytest.raises(DataError, match="metadata `pipeline` is not valid JSON"):
        load_bundle(str(path))

    _rewrite(path, tensors, {**metadata, "header": "a string"})
    with pytest.raises(DataError, match="`header` missing or not a JSON object"):
        load_bundle(str(path))

    _rewrite(path, tensors, {**metadata, "format": "something.else"})
    with pytest.raises(DataError, match="format 'something.else'"):
        load_bundle(str(path))

    _rewrite(path, tensors, {**metadata, "format_version": 99})
    with pytest.raises(DataError, match="format_version 99"):
        load_bundle(str(path))

    _rewrite(path, tensors, metadata, {**header, "classes": ["a", "b"]})
    with pytest.raises(DataError, match="2 classes but hparams.num_classes 3"):
        load_bundle(str(path))

    wider = {**header, "hparams": {**header["hparams"], "model": {**header["hparams"]["model"], "width": 8}}}
    _rewrite(path, tensors, metadata, wider)
    with pytest.raises(DataError) as err:
        load_bundle(str(path))
    assert "has shape" in err.value.render() and "the model needs" in err.value.render()

    huge = {**header, "hparams": {**header["hparams"], "model": {**header["hparams"]["model"], "width": 10**7}}}
    _rewrite(path, tensors, metadata, huge)  # built on the meta device: refused without allocating it
    with pytest.raises(DataError, match="has shape"):
        load_bundle(str(path))

    _rewrite(path, tensors, metadata, {**header, "hparams": {**header["hparams"], "model": {"arch": "gpt"}}})
    with pytest.raises(DataError, match="do not describe a model"):
        load_bundle(str(path))

    _rewrite(path, tensors, metadata, {**header, "hparams": {**header["hparams"], "evil": "os.system"}})
    with pytest.raises(DataError, match="do not describe a model"):
        load_bundle(str(path))

    renamed = {("x." + k if k.startswith("head") else k): v for k, v in tensors.items()}
    _rewrite(path, renamed, metadata, header)
    with pytest.raises(DataError) as err:
        load_bundle(str(path))
    assert "tensors missing" in err.value.render() and "does not have: x.head" in err.value.render()
    assert err.value.render().count(str(path)) == 2  # both problems, one message

    _rewrite(path, tensors, metadata, {**header, "transform": {"image_size": 16, "channels": 1}})
    with pytest.raises(DataError, match="does not produce the model's input"):
        load_bundle(str(path))


# ---------------------------------------------------------------- Markdown model card


def test_markdown_card_renders_any_card():
    assert render_markdown({}).startswith("# Model card")  # nothing known: still a document
    card = {"task": {"classes": ["a|b", "c"], "pretraining": "simclr on s3://x", "labels_per_class": 4},
            "data_version": "data-1", "corpus_version": "corpus-2", "data_source": "s3://b/t",
            "corpus_source": "s3://b/c", "image_transform": {"image_size": 8, "channels": 3},
            "metrics": {"test": {"accuracy": 0.9, "loss": 0.3}, "per_class": {"a|b": {"precision": 1, "recall": 0.5,
                                                                                        "support": 2}}},
            "model": "finetuned.safetensors"}
    text = render_markdown(card)
    assert "data-1" in text and "corpus-2" in text and "0.9000" in text and "`a\\|b`" in text
    assert "scratch" not in text and "Transfer gain" not in text and "![curves]" not in text
    assert "![curves](curves.png)" in render_markdown({**card, "curves": {"steps": 3}})
    assert "![curves](training.png)" in render_markdown({**card, "curves": "training.png"})
    usage = render_markdown({**card, "wall_time_s": {"pretrain": 12.5},
                             "device_hours": {"stages": {"pretrain": {"hours": 0.25, "kind": "gpu"}},
                                              "total": {"gpu": 0.25}},
                             "step_time": {"pretrain": {"median_ms": 40.0, "slowest_rank": 3, "slowest_ratio": 1.5}},
                             "promotion": {"run": "r1", "promoted": False, "reason": "challenger 0.9 vs 0.95",
                                           "challenger_accuracy": 0.9, "champion_run": "r0",
                                           "champion_accuracy": 0.95, "margin": 0.0},
                             "stages": {"pretrain": "restored"}})
    assert "| `pretrain` | 12.50 | 0.2500 gpu |" in usage and "0.2500 gpu-hours" in usage
    assert "| `pretrain` | 40.0 | 3 | 1.50 |" in usage
    assert "# Model card: r1" in usage and "**Not promoted.** challenger 0.9 vs 0.95" in usage
    assert "| challenger | `r1` | 0.9000 |" in usage and "| `pretrain` | restored |" in usage
