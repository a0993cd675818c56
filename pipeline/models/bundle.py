"""Model files that never execute code when loaded: safetensors weights plus a JSON header.

One `.safetensors` file per model. Its tensors are the module's state dict; its metadata (the
safetensors header's string map) has one key, `pipeline`, whose value is a JSON object:

    format          "pipeline.classifier" or "pipeline.backbone"
    format_version  1
    tensors_sha256  sha256 of the tensor data section (catches corruption safetensors would load)
    header          everything needed to rebuild the model, e.g. for a classifier
                    {"hparams": {...}, "classes": [...], "image_shape": [C, H, W],
                     "transform": {"image_size": 8, "channels": 1}}

One key, not several: safetensors writes its metadata map in a random order, and the same model
must always be the same bytes (DVC and the stage cache compare files by content).

Loading parses the JSON and the tensors (safetensors is a flat table of named arrays: no pickle,
no code), checks every tensor's name and shape against the model the header describes (built on
the `meta` device first, so a tampered header cannot make us allocate a huge model), and only then
builds the module. Anything missing, corrupt or inconsistent is a DataError (exit 2) naming the file.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import storage
from pipeline.errors import DataError
from pipeline.models.classifier import Classifier

FORMAT_VERSION = 1
METADATA_KEY = "pipeline"
CLASSIFIER_FORMAT = "pipeline.classifier"
BACKBONE_FORMAT = "pipeline.backbone"
_MAX_HEADER = 64 * 1024 * 1024  # safetensors' own limit is 100 MB; a real header here is a few KiB


@dataclass(frozen=True)
class ClassifierBundle:
    module: Classifier
    classes: list[str]
    transform: dict  # {"image_size": int, "channels": int}: pipeline.data.images.Transform's fields
    header: dict
    uri: str


# ---------------------------------------------------------------- writing


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Own, contiguous CPU storage per tensor: safetensors refuses views and shared memory.
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state.items()}


def _data_section(data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    return data[8 + length:]


def _serialize(state: dict[str, torch.Tensor], fmt: str, header: dict) -> bytes:
    from safetensors.torch import save

    tensors = _tensors(state)
    info = {"format": fmt, "format_version": FORMAT_VERSION, "header": header}
    # The tensor bytes do not depend on the metadata, so their checksum can go into it: a flipped bit
    # in the weights (which safetensors alone would load) is then caught.
    digest = hashlib.sha256(_data_section(save(tensors, metadata={METADATA_KEY: ""}))).hexdigest()
    return save(tensors, metadata={METADATA_KEY: json.dumps({**info, "tensors_sha256": digest}, sort_keys=True)})


def transform_of(image_shape: tuple[int, int, int] | list[int], transform: dict | None = None) -> dict:
    """The image transform to record: the prepared data's, else the one the (C, H, W) input shape implies."""
    if transform:
        return {"image_size": int(transform["image_size"]), "channels": int(transform["channels"])}
    channels, height, _ = image_shape
    return {"image_size": int(height), "channels": int(channels)}


def save_classifier(module: Classifier, classes: list[str], path: Path, transform: dict | None = None) -> None:
    """`module` with its classes and image transform (the prepared manifest's `transform`) as one file."""
    hparams = json.loads(json.dumps(dict(module.hparams)))  # plain JSON: tuples become lists
    image_shape = list(hparams["image_shape"])
    header = {"hparams": hparams, "classes": list(classes), "image_shape": image_shape,
              "transform": transform_of(image_shape, transform)}
    Path(path).write_bytes(_serialize(module.state_dict(), CLASSIFIER_FORMAT, header))


def save_backbone(backbone: torch.nn.Module, info: dict, path: Path) -> None:
    """A pretrained backbone's weights; `info` (JSON) holds its model config, image_shape and corpus_version."""
    Path(path).write_bytes(_serialize(backbone.state_dict(), BACKBONE_FORMAT, info))


# ---------------------------------------------------------------- reading


def _metadata(data: bytes, uri: str) -> dict:
    """This pipeline's metadata object from the safetensors header, read without trusting anything in the file."""
    problem = f"{uri}: not a safetensors model file"
    if len(data) < 8:
        raise DataError(f"{problem} ({len(data)} bytes)")
    (length,) = struct.unpack("<Q", data[:8])
    if not 2 <= length <= min(_MAX_HEADER, len(data) - 8):
        raise DataError(f"{problem} (header length {length} does not fit the file; a pickle or other file renamed?)")
    try:
        header = json.loads(data[8:8 + length])
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{problem} (header is not JSON)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not isinstance(metadata.get(METADATA_KEY), str):
        raise DataError(f"{uri}: safetensors file without this pipeline's metadata (`{METADATA_KEY}`)")
    try:
        info = json.loads(metadata[METADATA_KEY])
    except ValueError as exc:
        raise DataError(f"{uri}: metadata `{METADATA_KEY}` is not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise DataError(f"{uri}: metadata `{METADATA_KEY}` must be a JSON object")
    return info


def _read(uri: str, fmt: str) -> tuple[dict, dict[str, torch.Tensor], bytes]:
    """(JSON header, tensors, file bytes) of a model file of format `fmt`, all checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = storage.read_bytes(uri)  # missing: DataError naming the uri
    metadata = _metadata(data, uri)
    found = metadata.get("format")
    if found != fmt:
        raise DataError(f"{uri}: format {found!r}, expected {fmt!r}")
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise DataError(f"{uri}: format_version {version!r} is not one this code reads (1..{FORMAT_VERSION})")
    header = metadata.get("header")
    if not isinstance(header, dict):
        raise DataError(f"{uri}: metadata `header` missing or not a JSON object")
    if metadata.get("tensors_sha256") != hashlib.sha256(_data_section(data)).hexdigest():
        raise DataError(f"{uri}: tensor data does not match the checksum in its header (corrupt or modified)")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:
        raise DataError(f"{uri}: corrupt safetensors data ({exc})") from None
    return header, tensors, data


def _expect(header: dict, uri: str, key: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(key)
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{uri}: header `{key}` missing or not a {names}")
    return value


def _check_state(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], uri: str) -> None:
    """Every tensor the model has, none it lacks, each of its shape: else one DataError listing all."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"{uri}: tensors missing for the model in its header: {', '.join(missing[:10])}"
                        + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    if unexpected:
        problems.append(f"{uri}: tensors the model in its header does not have: {', '.join(unexpected[:10])}"
                        + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    for name in sorted(set(expected) & set(tensors)):
        want, got = expected[name], tensors[name]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"{uri}: tensor {name} has shape {list(got.shape)}, the model needs {list(want.shape)}")
        elif want.is_floating_point() != got.is_floating_point():
            problems.append(f"{uri}: tensor {name} is {got.dtype}, the model needs {want.dtype}")
    if problems:
        raise DataError(problems)


def load_bundle(uri: str) -> ClassifierBundle:
    """A `.safetensors` classifier file -> its checked, eval-mode model, classes and image transform."""
    header, tensors, _ = _read(uri, CLASSIFIER_FORMAT)
    hparams = _expect(header, uri, "hparams", dict)
    classes = _expect(header, uri, "classes", list)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{uri}: header `classes` must be a non-empty list of names")
    if hparams.get("num_classes") != len(classes):
        raise DataError(f"{uri}: header has {len(classes)} classes but hparams.num_classes "
                        f"{hparams.get('num_classes')!r}")
    shape = hparams.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise DataError(f"{uri}: hparams.image_shape must be [channels, height, width], got {shape!r}")
    raw_transform = header.get("transform")
    try:
        transform = transform_of(shape, raw_transform if isinstance(raw_transform, dict) else None)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{uri}: header `transform` must hold integer image_size and channels") from None
    if transform["channels"] not in (1, 3) or not 1 <= transform["image_size"] <= 4096 \
            or [transform["channels"], transform["image_size"], transform["image_size"]] != shape:
        raise DataError(f"{uri}: transform {transform} does not produce the model's input {shape}")
    try:
        with torch.device("meta"):  # shapes only: no memory, whatever the header claims
            skeleton = Classifier(**hparams).state_dict()
    except Exception as exc:  # a tampered config: pydantic, TypeError, shape errors from the backbone
        raise DataError(f"{uri}: header `hparams` do not describe a model this code builds "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    _check_state(skeleton, tensors, uri)
    module = Classifier(**hparams)
    module.load_state_dict(tensors, strict=True)
    return ClassifierBundle(module.eval(), list(classes), transform, header, uri)


def load_classifier(uri: str) -> tuple[Classifier, list[str]]:
    """(eval-mode classifier, class names) from a `.safetensors` classifier file."""
    bundle = load_bundle(uri)
    return bundle.module, bundle.classes


def load_backbone(uri: str) -> dict:
    """{"backbone": state dict, "model", "image_shape", "corpus_version", "sha256" (of the file)}."""
    header, tensors, data = _read(uri, BACKBONE_FORMAT)
    if not isinstance(header.get("model"), dict):
        raise DataError(f"{uri}: header `model` missing or not an object")
    return {**header, "backbone": tensors, "sha256": hashlib.sha256(data).hexdigest()}
