"""Dataset sources: which images there are, their classes and their bytes' sha256. Nothing is decoded.

- `builtin:digits` (target only): scikit-learn's 1,797 real 8x8 handwritten digits.
- `builtin:glyphs` (corpus only): synthetic printed digits (pipeline/data/glyphs.py), rendered at
  the configured size and channels, `pretrain.glyphs_per_class` per digit, from `seed`.
- an ImageFolder `<class>/<image>` (labelled), local or s3://; images may sit deeper in a class folder.
- corpus only: a folder with images at its top level (or no sub-folders) is unlabelled: every
  image anywhere under it.
Names starting with "." (.DS_Store, macOS `._x.jpg` forks, .ipynb_checkpoints) are not images or classes.

`scan_source` reads each file once: its sha256 and its header (size, mode), never its pixels, so
nothing holds the dataset in memory; a local file unchanged since a scan read it is not read again
(pipeline/data/file_hashes.py). Every problem is collected before failing, each naming its file
or folder, so one run tells the user everything to fix. An s3:// source is listed once (the listing
carries each object's ETag) and each object kept in a local cache (pipeline/data/object_cache.py).
"""
from __future__ import annotations

import collections
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

from pipeline import s3, storage
from pipeline.config import Config
from pipeline.data import object_cache
from pipeline.data.file_hashes import FileHashes, Known
from pipeline.data.glyphs import GLYPHS, RENDERER, GlyphParams, glyph_params
from pipeline.data.images import IMAGE_SUFFIXES, is_image_name, probe
from pipeline.data.shards import UNLABELLED
from pipeline.errors import DataError

Kind = Literal["data", "corpus"]  # the target (`data.source`) or the pretraining corpus (`pretrain.source`)
CONFIG_KEY = {"data": "data.source", "corpus": "pretrain.source"}
BUILTINS = {"data": ("builtin:digits",), "corpus": ("builtin:glyphs",)}
ID_PREFIX = {"data": "data-", "corpus": "corpus-"}
# Target: one image each for train, val and test; corpus: train and val.
MIN_IMAGES = {"data": 3, "corpus": 2}
_SUFFIXES_SHOWN = "/".join(IMAGE_SUFFIXES)


# Where an item's pixels come from: a local file (source or cached object), an S3 object, a builtin
# array, or a glyph's draws.
Origin = Union[str, object_cache.RemoteObject, np.ndarray, GlyphParams]


@dataclass(frozen=True, eq=False)
class Item:
    path: str  # as the user names it: the source's path or URI, or builtin:<name>/<i>
    label: int  # index into SourceScan.classes, or UNLABELLED
    origin: Origin
    sha256: str  # of the file's bytes (builtins: of what identifies their pixels)
    width: int
    height: int
    mode: str  # Pillow's, from the header


@dataclass
class SourceScan:
    source: str
    kind: Kind
    classes: list[str]  # [] for an unlabelled corpus
    items: list[Item]  # every readable image, in listing order (class, then path)
    problems: list[str]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def files(self) -> list[str]:
        """The source files the dataset is made of (paths or URIs as the user wrote them); [] for builtins."""
        return [item.path for item in self.items if isinstance(item.origin, (str, object_cache.RemoteObject))]

    def class_name(self, item: Item) -> str | None:
        return None if item.label == UNLABELLED else self.classes[item.label]

    def content_id(self) -> str:
        """Same bytes with the same classes -> same id, wherever they live. `data-`/`corpus-` + 16 hex."""
        digest = hashlib.sha256()
        for file_hash, label in sorted((item.sha256, self.class_name(item) or "") for item in self.items):
            digest.update(f"{file_hash} {label}\n".encode())
        return ID_PREFIX[self.kind] + digest.hexdigest()[:16]

    def check(self) -> None:
        if self.problems:
            raise DataError(self.problems)


def content_id(source: str, kind: Kind, cfg: Config) -> str:
    """The id `prepare` (kind "data") or `corpus` writes as data_version, from hashes alone (no decoding).

    Raises DataError listing every problem the stage would find before decoding."""
    scan = scan_source(source, kind, cfg)
    scan.check()
    return scan.content_id()


def scan_source(source: str, kind: Kind, cfg: Config, image_size: int | None = None) -> SourceScan:
    """List `source` and hash every image in it. Problems are collected in `.problems`, not raised,
    except a source that cannot be listed at all (missing, not a folder, access denied).

    `image_size`: the resolved side (image_size_for) that `builtin:glyphs` renders at; unset, the target's."""
    if source == "builtin:digits" and kind == "data":
        return _digits(source)
    if source == "builtin:glyphs" and kind == "corpus":
        return _glyphs(source, cfg, image_size if image_size is not None else target_image_size(cfg))
    if source.startswith("builtin:"):
        known = ", ".join(BUILTINS[kind])
        raise DataError(f"{CONFIG_KEY[kind]}: unknown builtin dataset {source!r} here (known: {known})")
    classes, listed, problems = _list_folder(source, kind)
    items, unreadable = _hash(source, listed, cfg.data.min_image_size)
    problems += unreadable
    problems += _count_problems(source, kind, classes, items)
    return SourceScan(source, kind, classes, items, problems)


# ---------------------------------------------------------------- builtins


def _digits(source: str) -> SourceScan:
    from sklearn.datasets import load_digits  # the data ships inside scikit-learn: no download

    digits = load_digits()
    # 0..16 intensities -> 0..255 bytes, the same dtype as images read from files.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    items = [Item(f"{source}/{i}", int(label), image, hashlib.sha256(image.tobytes()).hexdigest(), 8, 8, "L")
             for i, (image, label) in enumerate(zip(images, digits.target))]
    return SourceScan(source, "data", [str(n) for n in digits.target_names], items, [])


def _glyphs(source: str, cfg: Config, size: int) -> SourceScan:
    channels = cfg.data.channels
    items = []
    for i, params in enumerate(glyph_params(cfg.pretrain.glyphs_per_class, cfg.seed)):
        # A glyph is identified by its draws and output size (rendering is deterministic), so the
        # content id needs no rendering.
        digest = hashlib.sha256(f"{RENDERER} {size}x{size}x{channels} {tuple(params)!r}".encode()).hexdigest()
        items.append(Item(f"{source}/{i}", params.label, params, digest, size, size, "L" if channels == 1 else "RGB"))
    return SourceScan(source, "corpus", list(GLYPHS), items, [])


# ---------------------------------------------------------------- folders


def _list_folder(root: str, kind: Kind) -> tuple[list[str], list[tuple[str, int, dict]], list[str]]:
    """-> (classes, [(fs path, label, listing info)] in listing order, problems), in one recursive listing."""
    fs, base = storage.filesystem(root)
    with storage.access_errors(root):
        if not fs.exists(base) or not fs.isdir(base):
            raise DataError(f"{CONFIG_KEY[kind]}: {root} does not exist or is not a folder")
        found = fs.find(base, withdirs=True, detail=True)
    base = base.rstrip("/")
    top_dirs, images = set(), {}
    for name, info in found.items():
        parts = name[len(base) + 1:].split("/")
        if name == base or any(part.startswith(".") for part in parts):
            continue
        if info["type"] == "directory":
            if len(parts) == 1:
                top_dirs.add(parts[0])
        elif is_image_name(parts[-1]):
            images[name] = (parts[0] if len(parts) > 1 else None, info)
    loose = sorted(name for name, (folder, _) in images.items() if folder is None)

    if kind == "corpus" and (loose or not top_dirs):  # no images at all: _count_problems says so
        return [], [(name, UNLABELLED, images[name][1]) for name in sorted(images)], []

    problems = []
    if loose:
        hint = " (a plain folder of unlabelled images can be the pretraining corpus, pretrain.source)" \
            if kind == "data" else ""
        problems.append(f"{root}: images found directly in the folder ({loose[0].rsplit('/', 1)[-1]}, ...); "
                        f"expected ImageFolder layout <class>/<image>{hint}")
    if not top_dirs:
        problems.append(f"{root}: no class folders found (expected <class>/<image>)")
    classes = sorted(top_dirs)
    members = collections.defaultdict(list)
    for name in sorted(images):
        if images[name][0] is not None:
            members[images[name][0]].append(name)
    listed, display = [], _displayer(root)
    for label, folder in enumerate(classes):
        if not members[folder]:
            problems.append(f"{display(base + '/' + folder)}: empty class folder (no {_SUFFIXES_SHOWN} images)")
        listed += [(name, label, images[name][1]) for name in members[folder]]
    return classes, listed, problems


def _hash(root: str, listed: list[tuple[str, int, dict]], min_size: int) -> tuple[list[Item], list[str]]:
    """sha256 and header of every listed file, in listing order, on threads (hashing releases the GIL; S3
    GETs overlap). Unreadable or too-small images are problems; a denied or vanished object stops the scan."""
    fs = storage.filesystem(root)[0]
    remote, display = storage.is_remote(root), _displayer(root)
    cache = s3.cache_dir() if remote else None
    hashes = FileHashes(None) if remote else FileHashes.default()  # local files: unchanged ones are not read
    hashes.load(root)

    def one(entry: tuple[str, int, dict]) -> tuple[Item | None, str | None, bool]:
        name, label, info = entry
        shown = display(name)
        stat = None if remote else _stat(name)
        known = hashes.lookup(name, stat) if stat is not None else None
        if known is None:
            # S3 access errors (denied, vanished) propagate: one message, not one per object.
            data, origin, downloaded = object_cache.fetch(fs, name, info, shown, cache) if remote else (None, name, False)
            try:
                data = object_cache.read_origin(name, shown) if data is None else data
                known = Known(hashlib.sha256(data).hexdigest(), *probe(data, shown))
            except DataError as exc:
                return None, exc.problems[0], downloaded
            if stat is not None:
                hashes.remember(name, stat, known)
        else:
            origin, downloaded = name, False
        width, height = known.width, known.height
        if min(width, height) < min_size:
            return None, _TooSmall(f"{shown}: {width}x{height} px, shorter side below data.min_image_size="
                                   f"{min_size} (too small to resize up without making blur)", min(width, height)), downloaded
        return Item(shown, label, origin, known.sha256, width, height, known.mode), None, downloaded

    items, problems, downloaded = [], [], 0
    with ThreadPoolExecutor(32 if remote else None) as pool:  # S3: many GETs in flight; local: ~ the cores
        for item, problem, fetched in pool.map(one, listed):
            downloaded += fetched
            items += [item] if item else []
            problems += [problem] if problem else []
    hashes.save()
    if remote:
        print(f"[source] {root}: {len(listed)} images, {downloaded} downloaded, "
              f"{len(listed) - downloaded} from the local cache", flush=True)
    small = [problem for problem in problems if isinstance(problem, _TooSmall)]
    if small and not items:
        # Not one image is usable: one message about the setting, not one line per file.
        largest = max(problem.side for problem in small)
        problems = [p for p in problems if not isinstance(p, _TooSmall)] + [
            f"{root}: all {len(small)} image(s) have a shorter side below data.min_image_size={min_size} px "
            f"(the largest is {largest} px); lower data.min_image_size to {largest} if that resolution is "
            "what you want to train on, or use larger images"]
    return items, [str(problem) for problem in problems]


class _TooSmall(str):
    """A too-small image's problem line, with its shorter side."""

    def __new__(cls, text: str, side: int):
        line = super().__new__(cls, text)
        line.side = side
        return line


# ---------------------------------------------------------------- the image size


def image_size_for(scan: SourceScan, cfg: Config) -> tuple[int | None, str | None]:
    """(the side every image becomes, None) for the target's scan, or (None, the problem) when there is none.

    `data.image_size` a number: that number, unless it is larger than every image (all would be blown up).
    `auto`: the source's own shorter side when every image shares one (nothing is resized, only
    centre-cropped square): the digits demo's 8 px, or a folder of uniform images at their native size.
    Images of several shorter sides: a problem asking for `data.image_size` (no guess made for the user).
    """
    sides = collections.Counter(min(item.width, item.height) for item in scan.items)
    setting = cfg.data.image_size
    if setting != "auto":
        if sides and not _rendered(scan) and setting > max(sides):
            return None, (f"{scan.source}: data.image_size={setting} is larger than every image in it (the largest "
                          f"shorter side is {max(sides)} px): every image would be blown up into blur; set "
                          f"data.image_size to at most {max(sides)}, or to auto")
        return setting, None
    if len(sides) == 1:
        return next(iter(sides)), None
    if not sides:
        return None, None  # no readable image: the scan's own problems say why
    shown = ", ".join(f"{side} px x{count}" for side, count in sides.most_common(5))
    return None, (f"{scan.source}: data.image_size is auto, but the images have {len(sides)} different shorter "
                  f"sides ({shown}{', ...' if len(sides) > 5 else ''}); set data.image_size (e.g. 224 for photos, "
                  f"or {min(sides)} to never resize an image up)")


def target_image_size(cfg: Config) -> int:
    """The side every image of this run becomes (`data.image_size`, resolved): what `prepare` uses, and what the
    corpus shares. `auto` scans the target source (hashes and headers; nothing decoded). Raises DataError."""
    if cfg.data.image_size != "auto":
        return cfg.data.image_size
    scan = scan_source(cfg.data.source, "data", cfg)
    size, problem = image_size_for(scan, cfg)
    if size is None:
        raise DataError([*scan.problems, *([problem] if problem else [])]
                        or [f"{cfg.data.source}: no readable image to take data.image_size from"])
    return size


def check_corpus_size(scan: SourceScan, size: int) -> str | None:
    """A problem when every corpus image is smaller than the shared side `size` (all would be blown up)."""
    sides = [min(item.width, item.height) for item in scan.items]
    if not sides or _rendered(scan) or size <= max(sides):
        return None
    return (f"{scan.source}: every image of pretrain.source is smaller than the side the corpus shares with the "
            f"target (data.image_size: {size} px; the largest shorter side here is {max(sides)} px): every image would be "
            f"blown up into blur; use a corpus of larger images, or set data.image_size to at most {max(sides)}")


def _rendered(scan: SourceScan) -> bool:
    """builtin:glyphs: drawn at whatever size is asked, never resized."""
    return scan.source == "builtin:glyphs"


def _count_problems(root: str, kind: Kind, classes: list[str], items: list[Item]) -> list[str]:
    need = MIN_IMAGES[kind]
    if not classes:
        return [f"{root}: {len(items)} readable image(s) ({_SUFFIXES_SHOWN}); need at least {need}"] \
            if len(items) < need else []
    counts = collections.Counter(item.label for item in items)
    return [f"{root.rstrip('/')}/{name}: {counts[label]} image(s); need at least {need}"
            for label, name in enumerate(classes) if 0 < counts[label] < need]


def _stat(path: str):
    """Taken before the file is read: a write during the read changes it, so the next scan reads again."""
    try:
        return os.stat(path)
    except OSError:
        return None  # read_origin names the problem


def _displayer(root: str):
    """fs path -> the path as the user wrote it: s3://bucket/... stays an s3 URI, a relative folder relative."""
    fs_root = storage.filesystem(root)[1].rstrip("/")
    shown_root = root.rstrip("/")
    return lambda path: shown_root + path[len(fs_root):] if path.startswith(fs_root) else path
