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

import collections
import itertools
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.shards import SplitShards, fetch_shard, parse_shard, shard_arrays

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
                 rank_world: tuple[int, int] | None = None, uint8: bool = False):
        self.source, self.batch_size, self.seed, self.shuffle = source, batch_size, seed, shuffle
        self.readahead, self.cache_bytes, self.device = max(1, readahead), cache_bytes, device
        self.rank_world = rank_world  # None: from torch.distributed once the process group is up
        # uint8 NHWC batches, converted on the device (Classifier.on_after_batch_transfer): 4x fewer bytes
        # to copy to a GPU than float32. False: float NCHW in [-1, 1], what models take.
        self.uint8 = uint8
        # Held modes: the share's buffer, each shard's slot in it, and which slots are filled (a cached share
        # fills them while streaming its first epoch, so later epochs read nothing and copy nothing).
        self._buffer: tuple[np.ndarray, np.ndarray] | None = None
        self._slots: dict[int, int] = {}
        self._filled: set[int] = set()
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
        mode = self._mode()
        # A cached share streams its first epoch (training starts at once) and keeps what it read; from
        # epoch 1 it is held. By epoch number, not by history: a resumed run takes the same path.
        if mode == "global" or (mode == "cached" and epoch > 0):
            batches = self._held_batches(epoch, skip, needed)
        else:
            batches = self._streamed_batches(epoch, skip, needed)
        for images, labels in batches:
            yield (images if self.uint8 else to_float(images)), labels

    # held modes (global, and cached from its second epoch): each epoch is one permutation of the arrays
    def _held_batches(self, epoch: int, skip: int, needed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
        index = torch.from_numpy(order[skip:skip + needed]).to(images.device)
        for start in range(0, len(index), self.batch_size):
            part = index[start:start + self.batch_size]
            yield images[part], labels[part]

    def _hold(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._held is None:
            if isinstance(self.source, InMemorySplit):
                images, labels = self.source.images, self.source.labels
            else:
                images, labels = self._share_buffer()
                missing = [i for i in self._share() if i not in self._filled]  # e.g. skipped by a resume
                for _ in self._read_in_order(missing):
                    pass
            held = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.int64)
            self._held = tuple(t.to(self.device) for t in held) if self.device is not None else held
        return self._held

    def _share(self) -> list[int]:
        """This rank's shard indices in storage order: all of them in global mode."""
        rank, world = self._rank_world
        return list(range(len(self.source.uris))) if self._mode() == "global" \
            else deal_shards(self.source.counts, world)[rank]

    def _share_buffer(self) -> tuple[np.ndarray, np.ndarray]:
        """One preallocated array for the share (held modes): each shard is parsed straight into its slot."""
        if self._buffer is None:
            channels, height, width = self.source.image_shape
            share = self._share()
            total = sum(self.source.counts[i] for i in share)
            self._slots = dict(zip(share, itertools.accumulate([0] + [self.source.counts[i] for i in share])))
            self._buffer = (np.empty((total, height, width, channels), np.uint8), np.empty(total, np.int64))
        return self._buffer

    # stream mode (and a cached share's first epoch): windows of shards in a seeded order, read ahead
    def _streamed_batches(self, epoch: int, skip: int, needed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each batch is gathered straight from the window's shard arrays: one copy per sample on the way to the
        batch, and what is in memory is the window, the shards read ahead, and the batch being filled (a batch
        that spans two windows is finished from the next one after the previous is let go)."""
        rank, world = self._rank_world
        share = deal_shards(self.source.counts, world)[rank]
        channels, height, width = self.source.image_shape
        batch: tuple[np.ndarray, np.ndarray] | None = None
        filled = 0
        for passes in itertools.count():  # a share shorter than the epoch wraps around (another pass, another order)
            rng = np.random.default_rng([self.seed, epoch, rank, passes])
            order = [share[i] for i in rng.permutation(len(share))] if self.shuffle else list(share)
            windows = [order[i:i + WINDOW] for i in range(0, len(order), WINDOW)] if self.shuffle \
                else [[i] for i in order]
            # Skipping whole windows reads nothing: their sample counts are in the manifest.
            first = 0
            while first < len(windows) and skip >= (size := sum(self.source.counts[i] for i in windows[first])):
                skip -= size
                first += 1
            arrays = self._read_in_order([i for window in windows[first:] for i in window])
            for number, window in enumerate(windows[first:], start=first):
                if needed <= 0:
                    arrays.close()  # stops the read-ahead: nothing more is wanted this epoch
                    return
                parts = [next(arrays) for _ in window]
                total = sum(len(labels) for _, labels in parts)
                order_in = np.random.default_rng([self.seed, epoch, rank, passes, number]).permutation(total) \
                    if self.shuffle else np.arange(total)
                order_in, skip = order_in[skip:], 0
                position = 0
                while position < len(order_in) and needed > 0:
                    if batch is None:
                        size = min(self.batch_size, needed)
                        batch = np.empty((size, height, width, channels), np.uint8), np.empty(size, np.int64)
                    take = min(len(batch[1]) - filled, len(order_in) - position)
                    _gather_into(parts, order_in[position:position + take],
                                 batch[0][filled:filled + take], batch[1][filled:filled + take])
                    position, filled, needed = position + take, filled + take, needed - take
                    if filled == len(batch[1]):
                        images, labels = batch
                        batch, filled = None, 0
                        yield torch.from_numpy(images), torch.from_numpy(labels)
                del parts  # the window is let go before the next one is taken from the read-ahead
            if not self.shuffle or needed <= 0:
                break
        if batch is not None and filled:  # the data ran out before `needed` (a manifest that overstates nothing)
            yield torch.from_numpy(batch[0][:filled]), torch.from_numpy(batch[1][:filled])

    def _read_in_order(self, indices: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Shards' (images, labels) in the given order, fetched and parsed on `readahead` threads ahead of the
        consumer. A cached share's shards are parsed into their slots of the share's buffer (kept for later
        epochs); streamed ones are views of their own bytes (shard_arrays), freed once used."""
        if not indices:
            return
        held = self._mode() == "cached" or self._mode() == "global"
        if held:
            self._share_buffer()  # allocated here, once: the reader threads only fill their slots

        def load(index: int) -> tuple[np.ndarray, np.ndarray]:
            count, uri = self.source.counts[index], self.source.uris[index]
            if not held:  # a view of the shard's bytes where it can be: the batch gather is the one copy
                channels, height, width = self.source.image_shape
                return shard_arrays(fetch_shard(uri), uri, count, (height, width, channels))
            images, labels = self._share_buffer()
            start = self._slots[index]
            out_images, out_labels = images[start:start + count], labels[start:start + count]
            if index not in self._filled:
                out_labels[:] = parse_shard(fetch_shard(uri), uri, count, out_images)
                self._filled.add(index)
            return out_images, out_labels

        with ThreadPoolExecutor(max_workers=self.readahead, thread_name_prefix="shard-read") as pool:
            upcoming = iter(indices)
            inflight = collections.deque(pool.submit(load, i) for i in itertools.islice(upcoming, self.readahead))
            while inflight:
                arrays = inflight.popleft().result()
                nxt = next(upcoming, None)
                if nxt is not None:
                    inflight.append(pool.submit(load, nxt))
                yield arrays
                del arrays


def _gather_into(parts: list[tuple[np.ndarray, np.ndarray]], index: np.ndarray, images: np.ndarray,
                 labels: np.ndarray) -> None:
    """Copy samples `index` of the parts, taken as one array, into `images`/`labels`, without concatenating them."""
    start = 0
    for part_images, part_labels in parts:
        mine = (index >= start) & (index < start + len(part_labels))
        if mine.all():
            np.take(part_images, index - start, axis=0, out=images)
            np.take(part_labels, index - start, out=labels)
            return
        images[mine], labels[mine] = part_images[index[mine] - start], part_labels[index[mine] - start]
        start += len(part_labels)
