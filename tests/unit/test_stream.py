"""Shards and the per-rank stream: format, shares, order, resume position, bounded reads."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import shards as shardmod
from pipeline.data import stream as streammod
from pipeline.data.shards import Sample, SplitShards, read_shard, write_split
from pipeline.data.stream import InMemorySplit, ShardStream, deal_shards

N, PER_SHARD, BATCH = 103, 10, 8


def _split(tmp_path: Path, n: int = N, per_shard: int = PER_SHARD) -> SplitShards:
    # Pixel value = sample index (mod 256) and label = index: every batch says which samples it holds.
    entries = write_split(tmp_path, "train", (Sample(f"{i:08d}", np.full((2, 2, 1), i % 256, np.uint8), i)
                                              for i in range(n)), per_shard)
    return SplitShards(tuple(str(tmp_path / e["name"]) for e in entries), tuple(e["samples"] for e in entries),
                       (1, 2, 2))


def _labels(stream: ShardStream, epoch: int) -> list[list[int]]:
    stream.sampler.set_epoch(epoch)
    return [labels.tolist() for _, labels in stream]


def test_shards_are_webdataset_tars_that_read_back_exactly(tmp_path):
    split = _split(tmp_path)
    assert split.counts == (10,) * 10 + (3,)
    with tarfile.open(split.uris[0]) as tar:  # a plain tar: any webdataset reader (or tar) opens it
        assert tar.getnames()[:2] == ["00000000.cls", "00000000.npy"]
    images, labels, keys = read_shard(split.uris[-1], 3)
    assert keys == ["00000100", "00000101", "00000102"] and labels.tolist() == [100, 101, 102]
    assert images.shape == (3, 2, 2, 1) and images[:, 0, 0, 0].tolist() == [100, 101, 102]
    data = Path(split.uris[0]).read_bytes()
    fast = [(name, bytes(payload)) for name, payload in shardmod._members(data)]
    assert fast == [(name, bytes(payload)) for name, payload in shardmod._members_by_tarfile(data)]


def test_same_samples_give_byte_identical_shards(tmp_path):
    a, b = _split(tmp_path / "a"), _split(tmp_path / "b")
    assert [Path(u).read_bytes() for u in a.uris] == [Path(u).read_bytes() for u in b.uris]


def test_a_truncated_shard_is_an_error_not_fewer_samples(tmp_path):
    split = _split(tmp_path)
    path = Path(split.uris[0])
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(OSError, match="manifest says 10"):
        read_shard(split.uris[0], 10)


def test_pax_archives_are_read_through_tarfile(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in (("a.cls", b"4"), ("a.npy", _npy(np.zeros((2, 2, 1), np.uint8)))):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), 1.5  # a float mtime forces a pax record
            tar.addfile(info, io.BytesIO(payload))
    assert [(k, img.shape, label) for k, img, label in shardmod.iter_shard(buffer.getvalue())] == [("a", (2, 2, 1), 4)]


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def test_shards_are_dealt_balanced_and_disjoint():
    shares = deal_shards((10,) * 10 + (3,), 3)
    assert sorted(i for share in shares for i in share) == list(range(11))
    assert sorted(sum(10 if i < 10 else 3 for i in share) for share in shares) == [30, 33, 40]  # the best 10-sample shards allow


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["streamed", "cached"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_gets_equal_batches_from_its_own_shards(tmp_path, monkeypatch, world, cache_bytes):
    split = _split(tmp_path)
    reads: dict[int, list[str]] = {}
    for rank in range(world):
        seen: list[str] = []
        monkeypatch.setattr(streammod, "fetch_shard", lambda uri, seen=seen: (seen.append(uri), Path(uri).read_bytes())[1])
        stream = ShardStream(split, BATCH, seed=1, shuffle=True, cache_bytes=cache_bytes, rank_world=(rank, world))
        batches = _labels(stream, 0)
        assert len(batches) == len(stream) == -(-(-(-N // world)) // BATCH)
        assert sum(map(len, batches)) == -(-N // world)  # ceil(N / world) samples each, as DistributedSampler
        reads[rank] = seen
    owned = [set(uris) for uris in reads.values()]
    assert all(not (a & b) for i, a in enumerate(owned) for b in owned[i + 1:])  # nobody reads another's shard
    assert set().union(*owned) == set(split.uris)


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["streamed", "cached"])
def test_epochs_are_shuffled_differently_and_deterministically(tmp_path, cache_bytes):
    split = _split(tmp_path)
    make = lambda: ShardStream(split, BATCH, seed=1, shuffle=True, cache_bytes=cache_bytes, rank_world=(0, 1))
    first, second = _labels(make(), 0), _labels(make(), 1)
    assert sorted(sum(first, [])) == list(range(N)) == sorted(sum(second, []))
    assert first != second and _labels(make(), 1) == second


def _epochs(stream: ShardStream, epochs: range) -> dict[int, list[list[int]]]:
    return {epoch: _labels(stream, epoch) for epoch in epochs}


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["streamed", "cached"])
@pytest.mark.parametrize("world", [1, 3])
def test_resume_continues_at_the_exact_batch(tmp_path, cache_bytes, world):
    """Resumed in epoch 0 (a cached share is still streaming then) or in a later one: the rest of that epoch
    and every epoch after are the batches an uninterrupted run gets."""
    split = _split(tmp_path)
    make = lambda rank: ShardStream(split, BATCH, seed=1, shuffle=True, cache_bytes=cache_bytes,  # noqa: E731
                                    rank_world=(rank, world))
    for rank in range(world):
        full = _epochs(make(rank), range(4))
        per_epoch = len(full[0])
        for epoch in (0, 2):
            for done in (1, per_epoch - 1):
                resumed = make(rank)
                resumed.start_at(epoch * per_epoch + done)
                assert _labels(resumed, epoch) == full[epoch][done:]
                assert _epochs(resumed, range(epoch + 1, 4)) == {e: full[e] for e in range(epoch + 1, 4)}


def test_a_cached_share_is_read_once(tmp_path, monkeypatch):
    split = _split(tmp_path)
    fetched: list[str] = []
    monkeypatch.setattr(streammod, "fetch_shard", lambda uri: (fetched.append(uri), Path(uri).read_bytes())[1])
    stream = ShardStream(split, BATCH, seed=1, shuffle=True, cache_bytes=1 << 30, rank_world=(0, 1))
    epochs = _epochs(stream, range(3))
    assert sorted(fetched) == sorted(split.uris)  # epoch 0 streamed and kept them; epochs 1, 2 read nothing
    assert all(sorted(sum(batches, [])) == list(range(N)) for batches in epochs.values())


def test_resume_after_optimizer_steps_counts_accumulated_batches(tmp_path):
    split = _split(tmp_path)  # 13 batches per epoch; accumulate 4 -> 4 steps (the last one of 1 batch)
    full = _labels(ShardStream(split, BATCH, seed=1, shuffle=True, rank_world=(0, 1)), 1)
    resumed = ShardStream(split, BATCH, seed=1, shuffle=True, rank_world=(0, 1))
    resumed.resume_after(4 + 2, accumulate=4)  # one whole epoch (4 steps) + 2 steps = 8 batches into epoch 1
    assert _labels(resumed, 1) == full[8:]


def test_validation_reads_each_sample_once_across_ranks(tmp_path):
    split = _split(tmp_path)
    for world in (1, 2, 3, 20):  # 20 ranks > 11 shards: every rank holds the split, takes every 20th sample
        labels = [label for rank in range(world) for batch in
                  _labels(ShardStream(split, BATCH, seed=1, shuffle=False, rank_world=(rank, world)), 0)
                  for label in batch]
        assert sorted(labels) == list(range(N)), world


def test_in_memory_split_and_float_images(tmp_path):
    images = torch.linspace(-1, 1, 12 * 4).reshape(12, 1, 2, 2)
    stream = ShardStream(InMemorySplit(images, torch.arange(12)), 5, seed=0, shuffle=False, rank_world=(0, 1))
    batches = list(stream)
    assert [len(labels) for _, labels in batches] == [5, 5, 2]
    assert torch.equal(torch.cat([b for b, _ in batches]), images)  # float input passes through unscaled


def test_uint8_pixels_become_the_models_input_range(tmp_path):
    split = _split(tmp_path, n=4, per_shard=4)
    images, _ = next(iter(ShardStream(split, 4, seed=0, shuffle=False, rank_world=(0, 1))))
    assert images.dtype == torch.float32 and images.shape == (4, 1, 2, 2)
    assert torch.allclose(images[:, 0, 0, 0], torch.tensor([0, 1, 2, 3]) / 127.5 - 1)


def test_memory_holds_one_window_plus_the_readahead_not_the_split(tmp_path):
    """Streaming 100 shards holds the window, the shards read ahead and two batches (tracemalloc sees the shards'
    bytes and numpy's buffers): the bound is computed from the sizes, so it holds whatever the reader threads'
    timing."""
    import os
    import tracemalloc

    from pipeline.data.stream import WINDOW

    image = np.zeros((64, 64, 3), np.uint8)
    entries = write_split(tmp_path, "train", (Sample(f"{i:08d}", image, 0) for i in range(1000)), 10)
    split = SplitShards(tuple(str(tmp_path / e["name"]) for e in entries), tuple(e["samples"] for e in entries),
                        (3, 64, 64))
    readahead, batch_size = 2, 16
    file_bytes = max(os.path.getsize(uri) for uri in split.uris)  # a streamed shard's arrays are views of its bytes
    labels = 10 * 8
    batch = batch_size * (image.nbytes + 8)
    stream = ShardStream(split, batch_size, seed=1, shuffle=True, readahead=readahead, cache_bytes=0,
                         rank_world=(0, 1))
    assert sum(1 for _ in stream) == 63  # first epoch: imports done, so the trace below sees data only
    stream.sampler.set_epoch(1)
    tracemalloc.start()
    try:
        batches = sum(1 for _ in stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert batches == len(stream) == 63
    # The window and each read-ahead shard (bytes and labels), the batch being filled, the one the consumer holds
    # and a gather's temporary; 5 % for Python's own objects (futures, the labels' parse).
    bound = (WINDOW + readahead) * (file_bytes + labels) + 3 * batch
    assert peak < 1.05 * bound, f"peak {peak / file_bytes:.1f} shards, bound {bound / file_bytes:.1f}"


def test_uint8_batches_are_scaled_after_the_transfer_exactly_as_on_the_host(tmp_path):
    """On a GPU batches cross as uint8 (a quarter of the bytes) and the module scales them there."""
    from pipeline.models.classifier import Classifier

    split = _split(tmp_path, n=16, per_shard=16)
    host = list(ShardStream(split, 8, seed=0, shuffle=True, rank_world=(0, 1)))
    raw = list(ShardStream(split, 8, seed=0, shuffle=True, rank_world=(0, 1), uint8=True))
    module = Classifier(model={"width": 4, "depth": 1}, image_shape=(1, 2, 2), num_classes=16, optimizer={},
                        schedule={}, total_steps=1, lr=0.01)
    for (images, labels), (pixels, same_labels) in zip(host, raw, strict=True):
        assert pixels.dtype == torch.uint8 and pixels.shape == (8, 2, 2, 1)
        scaled, _ = module.on_after_batch_transfer((pixels, same_labels), 0)
        assert torch.equal(scaled, images) and torch.equal(labels, same_labels)
