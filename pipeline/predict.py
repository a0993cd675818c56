"""`pipeline predict IMAGE_OR_FOLDER...`: classify images with the champion, or any release.

The arguments are declared in pipeline/cli.py; this module is imported only when `predict` runs.

    pipeline predict photo.jpg                      # the champion (<registry>/champion.json)
    pipeline predict images/ --model 20261130-095125-silky-fossa   # a run under <registry>/releases/
    pipeline predict images/ --model s3://bucket/registry/releases/RUN --out predictions.csv
    pipeline predict images/ --model models/release/finetuned.safetensors --out predictions.json

Each image goes through the transform recorded in the model file (pipeline.data.images.decode,
the code that prepared the training data), then the model; one line per image is printed:
`path<TAB>class<TAB>confidence` (softmax probability of that class). A folder is walked
recursively for image files. Model files are safetensors plus a JSON header, never unpickled
(pipeline/models/bundle.py). Missing files, non-images, corrupt or tampered model files and "no
champion yet" are exit 2, every problem named in one message; nothing is printed or written then.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError, UserInputError

OUT_FORMATS = (".csv", ".json")


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str
    confidence: float


def _config(args: argparse.Namespace):
    from pipeline.config import DEFAULT_PARAMS
    from pipeline.params import load_config

    # No params file is needed to classify with a release: the default params.yaml is read only if present.
    # (Not via set_defaults(params=None) on the subparser: argparse shares the parent's --params action, so
    # that default would leak into every stage's subcommand.)
    params = args.params
    if params is None or (Path(params) == DEFAULT_PARAMS and not DEFAULT_PARAMS.exists()):
        params = None
    return load_config(params, args.overrides), Path(params).resolve().parent if params else Path.cwd()


def resolve_model(spec: str, registry: str) -> tuple[str, str]:
    """(model file URI, description) for `--model champion|RUN|URI`."""
    from pipeline import storage
    from pipeline.models.files import CLASSIFIER_FILE, SUFFIX

    if spec == "champion":
        pointer_uri = storage.join(registry, "champion.json")
        if not storage.exists(pointer_uri):
            raise DataError(f"no champion yet: {pointer_uri} does not exist. Train and promote one with "
                            "`pipeline run`, or name a model with --model RUN or --model URI")
        try:
            pointer = storage.read_json(pointer_uri)
            release, run = pointer["release"], pointer.get("run")
            assert isinstance(release, str) and release
        except (ValueError, KeyError, TypeError, AssertionError):
            raise DataError(f"{pointer_uri}: not a champion pointer (JSON with a `release` URI)") from None
        return storage.join(release, CLASSIFIER_FILE), f"champion, run {run}"
    if spec.endswith(".pt") or spec.endswith(".ckpt"):
        raise DataError(f"--model {spec}: pickle-based model files are never loaded (they can run code); "
                        f"use a release with {CLASSIFIER_FILE}")
    if "://" in spec or Path(spec).exists():
        if spec.endswith(SUFFIX):
            return spec, spec
        return storage.join(spec, CLASSIFIER_FILE), spec
    if "/" not in spec:
        release = storage.join(registry, "releases", spec)
        if storage.exists(release):
            return storage.join(release, CLASSIFIER_FILE), f"run {spec}"
        raise DataError(f"--model {spec}: neither a run in {storage.join(registry, 'releases')} "
                        "nor a file or folder")
    raise DataError(f"--model {spec}: no such file or folder")


def collect_images(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(image files, problems): files as named, folders walked recursively for image files."""
    from pipeline.data.images import IMAGE_SUFFIXES, is_image_name

    files: list[str] = []
    problems: list[str] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*")
                           if p.is_file() and is_image_name(p.name)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                problems.append(f"{raw}: folder holds no image files ({'/'.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(raw)  # named explicitly: decoded whatever its suffix, so a non-image is an error
        else:
            problems.append(f"{raw}: no such file or folder")
    return list(dict.fromkeys(files)), problems


def predict_files(bundle, files: list[str], batch_size: int) -> tuple[list[Prediction], list[str]]:
    """Decode with the bundle's transform, classify in batches; (predictions, problems)."""
    import numpy as np
    import torch

    from pipeline.data.images import Transform, decode
    from pipeline.data.stream import to_float

    transform = Transform(bundle.transform["image_size"], bundle.transform["channels"])
    predictions: list[Prediction] = []
    problems: list[str] = []
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        images = to_float(torch.from_numpy(np.stack([pixels for _, pixels in pending])))
        probabilities = bundle.module.predict_logits(images, batch_size).softmax(dim=1)
        confidence, index = probabilities.max(dim=1)
        predictions.extend(Prediction(path, bundle.classes[i], round(float(c), 6))
                           for (path, _), i, c in zip(pending, index.tolist(), confidence.tolist()))
        pending.clear()

    for path in files:
        try:
            data = Path(path).read_bytes()
            pending.append((path, decode(data, path, transform)))
        except DataError as exc:
            problems.extend(exc.problems)
        except OSError as exc:
            problems.append(f"{path}: unreadable ({exc.strerror or exc})")
        if len(pending) >= batch_size:
            flush()
    flush()
    return predictions, problems


def render(predictions: list[Prediction], out: str, model: dict) -> bytes:
    if out.lower().endswith(".json"):
        payload = {**model, "predictions": [{"path": p.path, "class": p.label, "confidence": p.confidence}
                                            for p in predictions]}
        return (json.dumps(payload, indent=2) + "\n").encode()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "class", "confidence"])
    writer.writerows((p.path, p.label, f"{p.confidence:.6f}") for p in predictions)
    return text.getvalue().encode()


def run(args: argparse.Namespace) -> int:
    problems: list[str] = []
    if args.out and not args.out.lower().endswith(OUT_FORMATS):
        problems.append(f"--out {args.out}: must end in .csv or .json")
    if args.batch_size is not None and args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size}: must be >= 1")
    cfg, project = _config(args)
    files, found_problems = collect_images(args.inputs)
    problems.extend(found_problems)

    from pipeline import storage
    from pipeline.models.bundle import load_bundle
    from pipeline.models.files import SUFFIX

    bundle, predictions = None, []
    try:
        uri, described = resolve_model(args.model, cfg.paths.project_uri("registry", project))
        legacy = uri.removesuffix(SUFFIX) + ".pt"
        if uri.endswith(SUFFIX) and not storage.exists(uri) and storage.exists(legacy):
            raise DataError(f"{legacy}: a pickle-based model file from before safetensors bundles; never loaded "
                            f"(it could run code): retrain, or use a release with {Path(uri).name}")
        bundle = load_bundle(uri)
    except UserInputError as exc:
        problems.extend(exc.problems)
    if bundle is not None and files:
        predictions, decode_problems = predict_files(bundle, files, args.batch_size or cfg.evaluate.batch_size)
        problems.extend(decode_problems)
    if problems:
        raise DataError(problems)
    for p in predictions:
        print(f"{p.path}\t{p.label}\t{p.confidence:.4f}")
    if args.out:
        model = {"model": uri, "described_as": described, "classes": bundle.classes, "transform": bundle.transform}
        storage.write_bytes(args.out, render(predictions, args.out, model))
    print(f"[predict] {len(predictions)} image(s) classified with {described} ({uri})"
          + (f"; written to {args.out}" if args.out else ""), file=sys.stderr)
    return 0
