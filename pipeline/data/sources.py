"""Dataset sources: `builtin:digits` or an ImageFolder (`<class>/<image>.png|jpg`), local or s3://.

Every problem with a folder source is collected before failing, each naming its file or
folder, so one run tells the user everything to fix.

An s3:// source is listed once per run (the listing carries each object's ETag) and each image
is kept in a local cache keyed by bucket, key and ETag (pipeline/s3.py `cache_dir`): a re-run
downloads only images that changed. The images are decoded into memory once; training never
reads the source again (it reads `prepare`'s output, itself loaded into memory once per stage).
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import storage
from pipeline.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class RawDataset:
    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int64 indices into class_names
    class_names: list[str]
    files: list[str]  # where each image came from, for the manifest
    hashes: list[str]  # sha256 of each image's stored bytes


def load_source(source: str) -> RawDataset:
    if source == "builtin:digits":
        return _load_digits()
    if source.startswith("builtin:"):
        raise DataError(f"data.source: unknown builtin dataset {source!r} (known: builtin:digits)")
    return _load_image_folder(source)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _load_digits() -> RawDataset:
    from sklearn.datasets import load_digits  # the data ships inside scikit-learn: no download

    digits = load_digits()
    # 0..16 intensities -> 0..255 bytes, the same dtype as images read from files.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    names = [str(n) for n in digits.target_names]
    return RawDataset(
        images=images,
        labels=digits.target.astype(np.int64),
        class_names=names,
        files=[f"builtin:digits/{i}" for i in range(len(images))],
        hashes=[_sha256(img.tobytes()) for img in images],
    )


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode fully: a truncated file fails here, not mid-training
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{name}: unreadable or corrupt image ({exc})") from None
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype != np.uint8:
        raise DataError(f"{name}: unsupported pixel type {array.dtype} (need 8-bit images)")
    return array


def _load_image_folder(root: str) -> RawDataset:
    fs, base = storage.filesystem(root)
    with storage.access_errors(root):
        if not fs.exists(base) or not fs.isdir(base):
            raise DataError(f"data.source: {root} does not exist or is not a folder")
        entries = fs.ls(base, detail=True)
    class_dirs = sorted(e["name"] for e in entries if e["type"] == "directory")
    loose = sorted(e["name"] for e in entries if e["type"] != "directory" and e["name"].lower().endswith(IMAGE_SUFFIXES))
    problems: list[str] = []
    if loose:
        problems.append(f"{root}: images found directly in the folder ({loose[0].rsplit('/', 1)[-1]}, ...); "
                        "expected ImageFolder layout <class>/<image>.png|jpg")
    if not class_dirs:
        problems.append(f"{root}: no class folders found (expected <class>/<image>.png|jpg)")
        raise DataError(problems)

    images, labels, files, hashes = [], [], [], []
    downloaded = 0
    names = [d.rstrip("/").rsplit("/", 1)[-1] for d in class_dirs]
    for label, (folder, name) in enumerate(zip(class_dirs, names)):
        with storage.access_errors(folder):
            listing = {f: info for f, info in fs.find(folder, detail=True).items() if f.lower().endswith(IMAGE_SUFFIXES)}
        members = sorted(listing)
        if not members:
            problems.append(f"{_display(root, folder)}: empty class folder (no .png/.jpg images)")
            continue
        with storage.access_errors(folder):
            contents, fetched = _read_cached(fs, listing) if storage.is_remote(root) else (fs.cat(members), 0)
        downloaded += fetched
        for member in members:
            shown = _display(root, member)
            try:
                images.append(_decode(contents[member], shown))
            except DataError as exc:
                problems.extend(exc.problems)
                continue
            labels.append(label)
            files.append(shown)
            hashes.append(_sha256(contents[member]))
    problems.extend(_shape_problems(images, files))
    if problems:
        raise DataError(problems)
    if storage.is_remote(root):
        print(f"[source] {root}: {len(files)} images, {downloaded} downloaded, "
              f"{len(files) - downloaded} from the local cache", flush=True)
    return RawDataset(np.stack(images), np.asarray(labels, dtype=np.int64), names, files, hashes)


def _read_cached(fs, listing: dict[str, dict]) -> tuple[dict[str, bytes], int]:
    """Objects' bytes, from the local ETag-keyed cache where possible; the rest in one batched fetch."""
    from pipeline import s3

    cache = s3.cache_dir()
    if cache is None:
        return fs.cat(sorted(listing)), len(listing)

    def slot(name: str, info: dict) -> Path:
        version = info.get("ETag") or info.get("etag") or f"{info.get('size')}-{info.get('LastModified')}"
        digest = hashlib.sha256(f"s3\0{name}\0{version}".encode()).hexdigest()
        return cache / digest[:2] / digest

    slots = {name: slot(name, info) for name, info in listing.items()}
    contents = {name: path.read_bytes() for name, path in slots.items() if path.is_file()}
    missing = sorted(name for name in listing if name not in contents)
    if missing:
        fetched = fs.cat(missing)  # concurrent GETs
        for name in missing:
            contents[name] = fetched[name]
            _cache_put(slots[name], fetched[name])
    return contents, len(missing)


def _cache_put(path: Path, data: bytes) -> None:
    """Write-then-rename, so a killed run never leaves a half image in the cache (no fsync: it is a cache)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full cache disk costs speed, not correctness


def _display(root: str, path: str) -> str:
    """The path as the user wrote it: s3://bucket/... stays an s3 URI."""
    fs_root = storage.filesystem(root)[1].rstrip("/")
    return root.rstrip("/") + path[len(fs_root):] if path.startswith(fs_root) else path


def _shape_problems(images: list[np.ndarray], files: list[str]) -> list[str]:
    if not images:
        return []
    shapes = [img.shape for img in images]
    expected = max(set(shapes), key=shapes.count)  # the majority shape is taken as intended
    return [
        f"{file}: image is {shape[1]}x{shape[0]} with {shape[2]} channel(s); "
        f"the rest are {expected[1]}x{expected[0]} with {expected[2]} (sizes and channels must match)"
        for file, shape in zip(files, shapes)
        if shape != expected
    ]
