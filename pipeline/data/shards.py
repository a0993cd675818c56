"""The prepared-data format: webdataset tar shards plus a manifest listing them.

Each split of a prepared dataset is a list of shards `shards/<split>-NNNNN.tar`. A sample is
`<key>.npy` (the decoded, resized image: uint8 H x W x C) and `<key>.cls` (its class index;
`-1` for unlabelled corpus images), written by webdataset's own TarWriter, so any webdataset
reader (or `tar tf`) opens them. Images are stored decoded: training reads them at memory
speed, with no per-epoch JPEG decoding on the critical path.

The manifest's `shards` section names each split's shards and their sample counts; readers
need nothing else to plan who reads what (pipeline/data/stream.py).
"""
from __future__ import annotations

import functools
import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import storage

SHARD_DIR = "shards"
UNLABELLED = -1


@dataclass(frozen=True)
class Sample:
    key: str  # unique within the dataset; the manifest's `files[i].key`
    image: np.ndarray  # uint8 (H, W, C)
    label: int  # class index, or UNLABELLED


@dataclass(frozen=True)
class SplitShards:
    """Where one split lives: shard URIs with their sample counts, and the image shape."""

    uris: tuple[str, ...]
    counts: tuple[int, ...]
    image_shape: tuple[int, int, int]  # (C, H, W), as models take it

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def sample_bytes(self) -> int:
        channels, height, width = self.image_shape
        return channels * height * width


def samples_per_shard(image_hwc: tuple[int, int, int], shard_mb: int) -> int:
    """Samples that fill about `shard_mb` MiB of decoded pixels (at least one)."""
    height, width, channels = image_hwc
    return max(1, (shard_mb << 20) // (height * width * channels))


def write_split(out_dir: Path, split: str, samples: Iterable[Sample], per_shard: int) -> list[dict]:
    """Write `samples` in order as shards of `per_shard` samples -> manifest entries [{name, samples}]."""
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    writer = None
    try:
        for sample in samples:
            if writer is None or entries[-1]["samples"] == per_shard:
                if writer is not None:
                    writer.close()
                name = f"{SHARD_DIR}/{split}-{len(entries):05d}.tar"
                writer = _ShardWriter(out_dir / name)
                entries.append({"name": name, "samples": 0})
            writer.write(sample)
            entries[-1]["samples"] += 1
    finally:
        if writer is not None:
            writer.close()
    return entries


class _ShardWriter:
    """The bytes webdataset's TarWriter(mtime=0) writes for {"__key__", "cls", "npy"} samples, ~10x faster.

    TarWriter encodes, sorts and copies each member through tarfile's stream (~200 us a 64x64x3 sample); this
    writes the same records directly: tarfile's own header (tobuf, PAX format as `tarfile.open("w|")` uses,
    mode 0o444, owner bigdata, mtime 0: the same samples give byte-identical shards, so DVC and the stage cache
    see no change), the payload, NUL padding to 512, and the end-of-archive blocks padded to tarfile's record
    size. tests/unit/test_shards.py compares the bytes with TarWriter's.
    """

    def __init__(self, path: Path):
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.offset = 0
        self._npy_headers: dict[tuple, bytes] = {}

    def _member(self, name: str, *parts: bytes | memoryview) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = sum(len(p) for p in parts), 0, 0o444, "bigdata", "bigdata"
        self._put(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"), *parts,
                  b"\0" * (-info.size % tarfile.BLOCKSIZE))

    def _put(self, *parts: bytes | memoryview) -> None:
        for part in parts:
            self.file.write(part)
            self.offset += len(part)

    def write(self, sample: Sample) -> None:
        image = np.ascontiguousarray(sample.image, dtype=np.uint8)
        header = self._npy_headers.get(image.shape)
        if header is None:  # numpy's own .npy header for this shape (what np.save writes before the pixels)
            stream = io.BytesIO()
            np.lib.format.write_array(stream, image)
            header = self._npy_headers[image.shape] = stream.getvalue()[:-image.nbytes or None]
        self._member(f"{sample.key}.cls", str(int(sample.label)).encode("ascii"))  # sorted: cls before npy
        self._member(f"{sample.key}.npy", header, memoryview(image).cast("B"))

    def close(self) -> None:
        self._put(b"\0" * (2 * tarfile.BLOCKSIZE))
        self._put(b"\0" * (-self.offset % tarfile.RECORDSIZE))
        self.file.close()


def split_shards(dataset_uri: str, manifest: dict, split: str) -> SplitShards:
    height, width, channels = manifest["image_shape"]
    entries = manifest["shards"].get(split, [])
    return SplitShards(tuple(storage.join(dataset_uri, e["name"]) for e in entries),
                       tuple(int(e["samples"]) for e in entries), (channels, height, width))


def _members(data: bytes) -> Iterator[tuple[str, memoryview]]:
    """(name, bytes) of each regular file in a tar, zero-copy.

    Plain ustar records (what webdataset's TarWriter writes for short names) are walked
    directly: 512-byte header, octal size, data padded to 512. tarfile costs ~50 us per member
    in Python, as much as copying a 224 px image; this costs ~2 us. Anything else in the
    archive (pax or GNU long-name records, links) goes through tarfile.
    """
    view, offset = memoryview(data), 0
    records: list[tuple[str, memoryview]] = []
    while offset + 512 <= len(data):
        header = data[offset:offset + 512]
        if header[0] == 0:  # end-of-archive blocks
            break
        if header[156:157] not in (b"0", b"\0") or header[257:262] != b"ustar":
            yield from _members_by_tarfile(data)
            return
        name = header[:100].rstrip(b"\0").decode()
        prefix = header[345:500].rstrip(b"\0").decode()
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        records.append((f"{prefix}/{name}" if prefix else name, view[offset + 512:offset + 512 + size]))
        offset += 512 + (size + 511) // 512 * 512
    yield from records


def _members_by_tarfile(data: bytes) -> Iterator[tuple[str, memoryview]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            if member.isfile():
                yield member.name, memoryview(data)[member.offset_data:member.offset_data + member.size]


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], int]:
    """(shape, offset of the pixels) from a .npy header; every image of a shard shares one, parsed once."""
    stream = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)
    if dtype != np.uint8 or fortran:
        raise OSError(f"shard image of dtype {dtype} (fortran order {fortran}); expected C-ordered uint8")
    return shape, stream.tell()


def _npy_header_len(payload: memoryview) -> int:
    """Bytes before the pixels in a .npy payload: magic, version, header length field and header (format 1 or 2)."""
    return 10 + int.from_bytes(payload[8:10], "little") if payload[6] == 1 else 12 + int.from_bytes(payload[8:12], "little")


def _npy_image(payload: memoryview) -> np.ndarray:
    # The pixels follow the .npy header: a view of them, not np.load's copy through a file object.
    header_len = _npy_header_len(payload)
    shape, offset = _npy_header(bytes(payload[:header_len]))
    return np.frombuffer(payload, dtype=np.uint8, offset=offset).reshape(shape)


def iter_shard(data: bytes) -> Iterator[tuple[str, np.ndarray, int]]:
    """(key, image, label) of each sample in one shard's bytes, in stored order (grouped as webdataset does)."""
    import webdataset as wds

    members = ({"fname": name, "data": payload, "__url__": "shard"} for name, payload in _members(data))
    for sample in wds.tariterators.group_by_keys(members):
        yield sample["__key__"], _npy_image(sample["npy"]), int(bytes(sample["cls"]))


VIEW_OVERHEAD = 1.25  # a streamed shard is kept as its tar bytes (no copy) while they are at most this x its pixels


def fetch_shard(uri: str) -> bytes:
    """A shard's bytes: one GET on S3 (the slow, latency-bound part, done ahead in threads)."""
    return storage.read_bytes(uri)


def _uniform_view(data: bytes, expected: int, image_hwc: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """The layout write_split gives, seen without a copy -> (images: a read-only strided view of `data`, labels);
    None when the shard is laid out otherwise.

    Each sample is `<key>.cls` then `<key>.npy`, plain ustar records, every image with the same .npy header, so
    sample i starts at i x stride and all pixels sit at one offset within it: the images are one strided array
    over the shard's bytes (~1 us a sample to check and copy, instead of ~12 us of per-member Python). Every header
    is still checked (ustar, regular file, one key per pair, one .npy header) and nothing may follow the last
    sample, or the general path reads the shard and names what is wrong with it."""
    image_bytes = int(np.prod(image_hwc))
    if expected < 1 or len(data) < 1024 or data[257:262] != b"ustar" or data[345:346] != b"\0":
        return None
    buf = np.frombuffer(data, np.uint8)
    cls_size = int(data[124:136].rstrip(b"\0 ") or b"0", 8)
    npy_at = 512 + (cls_size + 511) // 512 * 512
    first_cls, first_npy = data[:100].rstrip(b"\0"), data[npy_at:npy_at + 100].rstrip(b"\0")
    if not (0 < cls_size <= 512 and first_cls.endswith(b".cls") and first_npy == first_cls[:-3] + b"npy"):
        return None
    npy_size = int(data[npy_at + 124:npy_at + 136].rstrip(b"\0 ") or b"0", 8)
    stride = npy_at + 512 + (npy_size + 511) // 512 * 512
    payload = memoryview(data)[npy_at + 512:npy_at + 512 + npy_size]
    header_len = _npy_header_len(payload)
    if npy_size != header_len + image_bytes or len(data) < expected * stride or buf[expected * stride:].any():
        return None

    def rows(offset: int, width: int) -> np.ndarray:
        return np.lib.stride_tricks.as_strided(buf[offset:], (expected, width), (stride, 1), writeable=False)

    cls_headers, npy_headers = rows(0, 512), rows(npy_at, 512)
    names_differ = (cls_headers[:, :100] != npy_headers[:, :100]).sum(axis=1)  # ".cls" vs ".npy": 3 bytes
    if not ((cls_headers[:, 257:262] == npy_headers[0, 257:262]).all() and (npy_headers[:, 257:262] == npy_headers[0, 257:262]).all()
            and np.isin(cls_headers[:, 156], (48, 0)).all() and np.isin(npy_headers[:, 156], (48, 0)).all()
            and (names_differ == 3).all() and (npy_headers[:, 124:136] == npy_headers[0, 124:136]).all()
            and (cls_headers[:, 345:500] == 0).all() and (npy_headers[:, 345:500] == 0).all()
            and (rows(npy_at + 512, header_len) == buf[npy_at + 512:npy_at + 512 + header_len]).all()):
        return None
    if _npy_image(payload).shape != tuple(image_hwc):  # the shared .npy header (C-ordered uint8, or OSError)
        return None
    first = npy_at + 512 + header_len
    images = np.lib.stride_tricks.as_strided(buf[first:], (expected, *image_hwc),
                                             (stride, *np.empty(image_hwc, np.uint8).strides), writeable=False)
    labels = np.empty(expected, dtype=np.int64)
    for index in range(expected):
        at = index * stride
        labels[index] = int(data[at + 512:at + 512 + int(data[at + 124:at + 136].rstrip(b"\0 ") or b"0", 8)])
    return images, labels


def shard_arrays(data: bytes, uri: str, expected: int, image_hwc: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A shard's (images uint8 (expected, H, W, C), labels int64). In write_split's layout, and where the tar records
    add at most VIEW_OVERHEAD to the pixels (64 px images and up), a view of `data`: no copy, the loader's gather
    into a batch is the one. Small images (32 px: 5 KB of records per 3 KB image) are copied out compactly, so the
    bytes can go; any other layout is parsed into arrays of its own."""
    view = _uniform_view(data, expected, image_hwc)
    if view is not None:
        images, labels = view
        if len(data) <= VIEW_OVERHEAD * images[0].nbytes * expected:
            return view
        return images.copy(), labels
    images = np.empty((expected, *image_hwc), np.uint8)
    return images, _parse_members(data, uri, expected, images)


def parse_shard(data: bytes, uri: str, expected: int, out: np.ndarray) -> np.ndarray:
    """Parse a shard's samples straight into `out` (uint8 (expected, H, W, C)) -> their labels (int64)."""
    view = _uniform_view(data, expected, out.shape[1:])
    if view is not None:
        out[:] = view[0]
        return view[1]
    return _parse_members(data, uri, expected, out)


def _parse_members(data: bytes, uri: str, expected: int, out: np.ndarray) -> np.ndarray:
    """Any tar layout, member by member (naming a cut-short or foreign shard) -> labels."""
    labels = np.empty(expected, dtype=np.int64)
    count = 0
    try:
        for count, (_, image, label) in enumerate(iter_shard(data), start=1):
            if count > expected:
                break
            out[count - 1], labels[count - 1] = image, label
    except (ValueError, KeyError, IndexError) as exc:  # a member cut short, or not what write_split writes
        raise OSError(f"{uri}: unreadable sample {count} ({exc}) (truncated or replaced shard)") from None
    if count != expected:
        raise OSError(f"{uri}: {count if count <= expected else 'more'} samples, the manifest says {expected} "
                      "(truncated or replaced shard)")
    return labels


def read_shard(uri: str, expected: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One shard -> (images uint8 (N, H, W, C), labels int64, keys). One GET on S3."""
    keys, images, labels = [], [], []
    for key, image, label in iter_shard(fetch_shard(uri)):
        keys.append(key)
        images.append(image)
        labels.append(label)
    if expected is not None and len(keys) != expected:
        raise OSError(f"{uri}: {len(keys)} samples, the manifest says {expected} (truncated or replaced shard)")
    return np.stack(images), np.asarray(labels, dtype=np.int64), keys
