"""The shard format: what write_split writes is webdataset's own TarWriter's bytes, and parse_shard's fast path
reads exactly what the general path (webdataset's member grouping) reads, or leaves the shard to it."""
from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from pipeline.data import shards
from pipeline.data.shards import Sample, fetch_shard, parse_shard, shard_arrays, write_split

SHAPES = [(8, 8, 1), (64, 64, 3), (5, 7, 3)]


def _samples(shape, count=23, seed=0) -> list[Sample]:
    images = np.random.default_rng(seed).integers(0, 255, (count, *shape), dtype=np.uint8)
    # keys of several lengths, unlabelled (-1) and multi-digit labels: what prepare and corpus write
    return [Sample(f"k{i}" * (1 + i % 3), images[i], -1 if i % 5 == 0 else i * 13) for i in range(count)]


@pytest.mark.parametrize("shape", SHAPES)
def test_shards_are_byte_for_byte_what_webdatasets_tarwriter_writes(tmp_path, shape):
    samples = _samples(shape)
    entries = write_split(tmp_path, "train", samples, 10)
    assert [e["samples"] for e in entries] == [10, 10, 3]
    for index, entry in enumerate(entries):
        reference = tmp_path / f"reference-{index}.tar"
        writer = wds.TarWriter(str(reference), mtime=0)
        for sample in samples[index * 10:(index + 1) * 10]:
            writer.write({"__key__": sample.key, "npy": sample.image, "cls": sample.label})
        writer.close()
        assert (tmp_path / entry["name"]).read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("shape", SHAPES)
def test_the_strided_parse_reads_what_the_general_path_reads(tmp_path, shape, monkeypatch):
    samples = _samples(shape)
    (entry, *_) = write_split(tmp_path, "train", samples, 10)
    data = fetch_shard(str(tmp_path / entry["name"]))
    fast_images = np.empty((10, *shape), np.uint8)
    assert shards._uniform_view(data, 10, shape) is not None  # write_split's layout takes the fast path
    fast_labels = parse_shard(data, "shard", 10, fast_images)
    view_images, view_labels = shard_arrays(data, "shard", 10, shape)
    # A streamed shard is not copied where its tar records add little (64 px and up); tiny images are, compactly.
    small_records = len(data) <= shards.VIEW_OVERHEAD * fast_images.nbytes
    assert np.shares_memory(view_images, np.frombuffer(data, np.uint8)) == small_records == (shape == (64, 64, 3))
    monkeypatch.setattr(shards, "_uniform_view", lambda *args: None)
    general_images = np.empty((10, *shape), np.uint8)
    general_labels = parse_shard(data, "shard", 10, general_images)
    own_images, own_labels = shard_arrays(data, "shard", 10, shape)
    for images, labels in ((general_images, general_labels), (view_images, view_labels), (own_images, own_labels)):
        assert np.array_equal(fast_images, images) and np.array_equal(fast_labels, labels)
    assert not np.shares_memory(own_images, np.frombuffer(data, np.uint8))
    assert np.array_equal(fast_images, np.stack([s.image for s in samples[:10]]))
    assert fast_labels.tolist() == [s.label for s in samples[:10]]


def test_a_shard_not_as_the_manifest_says_is_refused_by_both_paths(tmp_path):
    (entry, *_) = write_split(tmp_path, "train", _samples((64, 64, 3)), 10)
    data = fetch_shard(str(tmp_path / entry["name"]))
    for expected in (9, 11):  # more or fewer samples than the manifest says
        with pytest.raises(OSError, match="the manifest says"):
            parse_shard(data, "shard", expected, np.empty((expected, 64, 64, 3), np.uint8))
    with pytest.raises(OSError, match="truncated or replaced shard"):  # cut inside a member
        parse_shard(data[:len(data) // 2 + 7], "shard", 10, np.empty((10, 64, 64, 3), np.uint8))
    with pytest.raises(OSError, match="truncated or replaced shard"):  # another image shape
        parse_shard(data, "shard", 10, np.empty((10, 32, 32, 3), np.uint8))
    for expected in (9, 11):  # the streamed path refuses what the held one refuses
        with pytest.raises(OSError, match="the manifest says"):
            shard_arrays(data, "shard", expected, (64, 64, 3))
