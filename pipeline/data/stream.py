"""Batches for one rank, streamed from shards: bounded memory, each rank reads its share, resumable.

`ShardStream` is the train/val loader Lightning gets. Who reads what:

- **share** (the normal case, at least as many shards as ranks): shards are dealt to ranks once,
  balanced by sample count, so each rank reads only its share, from local disk or S3. An epoch
  visits the share's shards in a seeded order, in windows of `WINDOW` shards whose samples are
  shuffled together (the shards themselves are class-mixed at write time). Shards are read
  ahead in threads (`readahead`), so S3 latency hides behind training. A share that fits in
  `cache_bytes` is kept decoded after its first read and shuffled whole each epoch.
- **global** (fewer shards than ranks, or arrays already in memory such as a label-budget
  subset): every rank holds the split and takes every world-th sample of a seeded global
  permutation, as DistributedSampler does.

Every rank yields the same number of batches per epoch (ceil(samples / world / batch), as
Lightning counts with a DistributedSampler): a share shorter than that wraps around, a longer
one stops early. The order is a pure function of (seed, epoch, rank, position), so `start_at`
puts a resumed run exactly where the checkpoint was: the resumed run sees the batches an
uninterrupted one would have.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.shards import SplitShards, read_shard

WINDOW = 2  # shards shuffled together while streaming: more mixing for one more shard in memory


@dataclass(frozen=True)
class InMemorySplit:
    """Arrays already in memory (a label-budget subset): every rank holds all of them."""

    images: np.ndarray | torch.Tensor  # uint8 (N, H, W, C), or float (N, C, H, W) already scaled
    labels: np.ndarray | torch.Tensor  # int64

    @property
    def samples(self) -> int:
        return len(self.labels)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1], the models' input (float input passes)."""
    if images.is_floating_point():
        return images
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def deal_shards(counts: tuple[int, ...], world: int) -> list[list[int]]:
    """Shard indices per rank: each shard to the rank with the fewest samples so far (ties: lowest rank)."""
    shares: list[list[int]] = [[] for _ in range(world)]
    totals = [0] * world
    for index in sorted(range(len(counts)), key=lambda i: -counts[i]):
        rank = min(range(world), key=lambda r: (totals[r], r))
        shares[rank].append(index)
        totals[rank] += counts[index]
    return [sorted(share) for share in shares]


class _EpochSampler:
    """Lightning calls `loader.sampler.set_epoch(epoch)` before each epoch (also after a resume)."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class ShardStream:
    """An iterable of (images float32 NCHW, labels int64) batches for this rank."""

    def __init__(self, source: SplitShards | InMemorySplit, batch_size: int, *, seed: int, shuffle: bool,
                 readahead: int = 1, cache_bytes: int = 1 << 30, device: torch.device | None = None,
                 rank_world: tuple[int, int] | None = None):
        self.source, self.batch_size, self.seed, self.shuffle = source, batch_size, seed, shuffle
        self.readahead, self.cache_bytes, self.device = max(1, readahead), cache_bytes, device
        self.rank_world = rank_world  # None: from torch.distributed once the process group is up
        self.sampler = _EpochSampler()
        self.batch_sampler = None  # as a DataLoader says "I batch myself" to Lightning's checks
        self._resume_epoch, self._resume_batches = -1, 0
        self._resume_step: tuple[int, int] | None = None
        self._held: tuple[torch.Tensor, torch.Tensor] | None = None  # the arrays of global/cached modes

    # ---- plan
    @property
    def _rank_world(self) -> tuple[int, int]:
        return self.rank_world or dist_rank_world()

    def _mode(self) -> str:
        rank, world = self._rank_world
        if isinstance(self.source, InMemorySplit) or len(self.source.uris) < world:
            return "global"
        share_bytes = sum(self.source.counts[i] for i in deal_shards(self.source.counts, world)[rank]) \
            * self.source.sample_bytes
        return "cached" if share_bytes <= self.cache_bytes else "stream"

    def _samples_this_rank(self) -> int:
        rank, world = self._rank_world
        total = self.source.samples
        if self.shuffle:
            return math.ceil(total / world)  # every rank the same: DDP needs equal batch counts
        if self._mode() == "global":
            return len(range(rank, total, world))
        return sum(self.source.counts[i] for i in deal_shards(self.source.counts, world)[rank])

    def __len__(self) -> int:
        return math.ceil(self._samples_this_rank() / self.batch_size)

    def start_at(self, batches_done: int) -> None:
        """Resume: the next epoch to run skips the batches a checkpoint says were already trained on."""
        self._resume_epoch, self._resume_batches = divmod(batches_done, len(self))

    def resume_after(self, global_step: int, accumulate: int) -> None:
        """Resume after `global_step` optimizer steps of `accumulate` batches each; resolved at the first
        iteration, once the process group (and so this rank's batch count) is known."""
        self._resume_step = (global_step, accumulate)

    def _resolve_resume(self) -> None:
        if self._resume_step is None:
            return
        (step, accumulate), self._resume_step = self._resume_step, None
        per_epoch = len(self)
        # Lightning steps once more at an epoch's end when its batch count is not a multiple of `accumulate`.
        epochs, within = divmod(step, math.ceil(per_epoch / accumulate))
        self.start_at(epochs * per_epoch + within * accumulate)

    def state_dict(self) -> dict:
        # The position itself comes from the checkpoint's global step (start_at); this marks the loader
        # resumable for Lightning and records the plan it belongs to.
        return {"batches_per_epoch": len(self), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batches_per_epoch") not in (None, len(self)):
            raise ValueError(f"checkpoint was taken with {state['batches_per_epoch']} batches per epoch, "
                             f"this run has {len(self)}: not the same data or world size")

    # ---- iterate
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._resolve_resume()
        epoch = self.sampler.epoch
        skip = self._resume_batches * self.batch_size if epoch == self._resume_epoch else 0
        if epoch == self._resume_epoch:
            self._resume_epoch = -1  # only the first epoch after a resume starts mid-way
        needed = self._samples_this_rank() - skip
        chunks = self._chunks(epoch, skip) if self._mode() == "stream" else self._held_chunks(epoch, skip)
        yield from self._batches(chunks, needed)

    def _batches(self, chunks: Iterator[tuple[torch.Tensor, torch.Tensor]], needed: int):
        """Cut the chunk stream into batches of `batch_size` (the last one may be short), `needed` samples in all."""
        images_left, labels_left = None, None
        for images, labels in chunks:
            if needed <= 0:
                break
            images, labels = images[:needed], labels[:needed]
            needed -= len(labels)
            if labels_left is not None and len(labels_left):
                images, labels = torch.cat([images_left, images]), torch.cat([labels_left, labels])
            whole = len(labels) // self.batch_size * self.batch_size
            for start in range(0, whole, self.batch_size):
                yield to_float(images[start:start + self.batch_size]), labels[start:start + self.batch_size]
            images_left, labels_left = images[whole:], labels[whole:]
        if labels_left is not None and len(labels_left):
            yield to_float(images_left), labels_left

    # global and cached modes: the arrays are held; each epoch is one permutation of them
    def _held_chunks(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = self._rank_world
        images, labels = self._hold()
        count = len(labels)
        if self._mode() == "global":
            order = (np.random.default_rng([self.seed, epoch]).permutation(count) if self.shuffle
                     else np.arange(count))
            if self.shuffle:
                padded = math.ceil(count / world) * world
                order = np.resize(order, padded)  # wraps around, as DistributedSampler pads
            order = order[rank::world]
        else:
            order = (np.random.default_rng([self.seed, epoch, rank]).permutation(count) if self.shuffle
                     else np.arange(count))
            if self.shuffle:
                order = np.resize(order, self._samples_this_rank())
        index = torch.from_numpy(order[skip:]).to(images.device)
        for start in range(0, len(index), 64 * self.batch_size):  # gather a few batches at a time
            part = index[start:start + 64 * self.batch_size]
            yield images[part], labels[part]

    def _hold(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._held is None:
            if isinstance(self.source, InMemorySplit):
                images, labels = self.source.images, self.source.labels
            else:
                rank, world = self._rank_world
                mine = range(len(self.source.uris)) if self._mode() == "global" \
                    else deal_shards(self.source.counts, world)[rank]
                images, labels = self._read_into_one(list(mine))
            held = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.int64)
            self._held = tuple(t.to(self.device) for t in held) if self.device is not None else held
        return self._held

    def _read_into_one(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Shards into one preallocated array: the held copy is the only full-size one."""
        channels, height, width = self.source.image_shape
        total = sum(self.source.counts[i] for i in indices)
        images, labels = np.empty((total, height, width, channels), np.uint8), np.empty(total, np.int64)
        start = 0
        for shard_images, shard_labels in self._read_in_order(indices):
            images[start:start + len(shard_labels)], labels[start:start + len(shard_labels)] = shard_images, shard_labels
            start += len(shard_labels)
        return images, labels

    # stream mode: windows of shards in a seeded order, read ahead
    def _chunks(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = self._rank_world
        share = deal_shards(self.source.counts, world)[rank]
        passes = 0
        while True:  # a share shorter than the epoch wraps around (another pass, another order)
            rng = np.random.default_rng([self.seed, epoch, rank, passes])
            order = [share[i] for i in rng.permutation(len(share))] if self.shuffle else list(share)
            windows = [order[i:i + WINDOW] for i in range(0, len(order), WINDOW)] if self.shuffle \
                else [[i] for i in order]
            # Skipping whole windows reads nothing: their sample counts are in the manifest.
            first = 0
            while first < len(windows) and skip >= (size := sum(self.source.counts[i] for i in windows[first])):
                skip -= size
                first += 1
            flat = [i for window in windows[first:] for i in window]
            arrays = self._read_in_order(flat)
            for number, window in enumerate(windows[first:], start=first):
                parts = [next(arrays) for _ in window]
                images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
                labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
                del parts
                order = np.random.default_rng([self.seed, epoch, rank, passes, number]).permutation(len(labels)) \
                    if self.shuffle else np.arange(len(labels))
                order, skip = order[skip:], 0
                for start in range(0, len(order), 8 * self.batch_size):  # gathered a few batches at a time
                    part = order[start:start + 8 * self.batch_size]
                    yield torch.from_numpy(images[part]), torch.from_numpy(labels[part])
            passes += 1
            if not self.shuffle:
                return

    def _read_in_order(self, indices: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Shards' arrays in the given order, `readahead` reads in flight ahead of the consumer."""
        if not indices:
            return
        with ThreadPoolExecutor(max_workers=self.readahead, thread_name_prefix="shard-read") as pool:
            inflight: list[Future] = []
            upcoming = iter(indices)
            for index in upcoming:
                inflight.append(pool.submit(read_shard, self.source.uris[index], self.source.counts[index]))
                if len(inflight) > self.readahead:
                    break
            while inflight:
                images, labels, _ = inflight.pop(0).result()
                nxt = next(upcoming, None)
                if nxt is not None:
                    inflight.append(pool.submit(read_shard, self.source.uris[nxt], self.source.counts[nxt]))
                yield images, labels
