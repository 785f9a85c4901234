"""Streaming shards into batches: infinite training streams with a saved position, and finite
exactly-once streams for evaluation.

Why not webdataset's `split_by_node`/`split_by_worker` + `shuffle`: their order depends on the rank
and on an RNG that is never saved, so a resumed run cannot continue where it stopped, and a rank
with no shard silently yields nothing. We keep webdataset for what it is good at (opening local,
http and `pipe:` URLs, expanding tars into samples, the shuffle buffer) and plan the order ourselves:

* A stream reads *units*: whole shards, or, when there are fewer shards than consumers, strided
  parts of shards (every consumer always gets data).
* Consumers are (rank, worker) pairs; there are `world * max(workers, 1)` of them. In data epoch
  `e`, the units are permuted by (seed, e) and consumer `c` takes every C-th one from position c.
* Within a shard, the sample order is a shuffle buffer seeded by (seed, e, shard) (a full
  permutation when the shard fits in the buffer). A sample's augmentation is seeded by
  (seed, e, shard, position), so it does not depend on workers, resumption or rank.
* A consumer's position is therefore just (epoch, cursor in its unit list, samples emitted from the
  current unit): three integers, saved with every checkpoint. Resuming re-opens one unit and skips
  the emitted samples before decoding them; nothing else is re-read.

Resuming needs the same number of ranks and workers (then the stream continues with exactly the
samples the uninterrupted run would have seen). Any other layout is refused with one clear error.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_ssl.data.shards import Manifest, decode_sample
from dist_ssl.errors import UserError

_MASK = (1 << 64) - 1


def mix(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps): seeds that differ for every (seed, epoch, ...)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state + (value & _MASK) + 0x9E3779B97F4A7C15) & _MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        state = z ^ (z >> 31)
    return state >> 1


@dataclass(frozen=True)
class Unit:
    shard: int
    part: int = 0
    parts: int = 1

    def length(self, manifest: Manifest) -> int:
        return len(range(self.part, manifest.shards[self.shard].num_samples, self.parts))


def make_units(num_shards: int, consumers: int) -> list[Unit]:
    parts = 1 if num_shards >= consumers else math.ceil(consumers / num_shards)
    return [Unit(s, j, parts) for s in range(num_shards) for j in range(parts)]


def raw_samples(url: str) -> Iterator[dict]:
    """Samples of one tar shard (local path, http(s):// or pipe:), grouped by key, not decoded."""
    import webdataset as wds

    return wds.tarfile_to_samples()(iter([{"url": url}]))


def unit_samples(manifest: Manifest, unit: Unit, seed: int, epoch: int, shuffle_buffer: int) -> Iterator[tuple[int, dict]]:
    """(position in the shard's shuffled order, raw sample) for the samples of `unit` in `epoch`."""
    import webdataset as wds

    samples = raw_samples(manifest.url(manifest.shards[unit.shard]))
    rng = random.Random(mix(seed, epoch, unit.shard))
    shuffled = wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng)(samples)
    for position, raw in enumerate(shuffled):
        if position % unit.parts == unit.part:
            yield position, raw


class TrainStream(IterableDataset):
    """An infinite stream of batches for one rank; each batch carries its consumer's position."""

    def __init__(
        self,
        manifest: Manifest,
        batch_size: int,
        views: dict,
        rank: int,
        world: int,
        workers: int,
        seed: int,
        shuffle_buffer: int,
        state: dict | None = None,
    ):
        self.manifest = manifest
        self.batch_size = batch_size
        self.views = views
        self.rank, self.world, self.workers = rank, world, workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.slots = max(workers, 1)
        self.consumers = world * self.slots
        if manifest.num_samples < self.consumers:
            raise UserError(
                f"split {manifest.root} has {manifest.num_samples} samples, fewer than the "
                f"{world} ranks x {self.slots} workers that read it"
            )
        self.units = make_units(len(manifest.shards), self.consumers)
        self.positions: dict[int, tuple[int, int, int]] = {}
        self.batches = 0  # batches this rank has consumed, over all resumptions
        if state:
            self.load_state_dict(state)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "world": self.world,
            "workers": self.slots,
            "batches": self.batches,
            "positions": {int(c): list(p) for c, p in self.positions.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["world"] != self.world or state["workers"] != self.slots:
            raise UserError(
                f"cannot resume the stream of {self.manifest.root}: it was read by {state['world']} ranks x "
                f"{state['workers']} workers, this run has {self.world} x {self.slots}; resume with the same "
                "number of processes and data.workers"
            )
        self.batches = int(state["batches"])
        self.positions = {int(c): tuple(p) for c, p in state["positions"].items()}

    def observe(self, batch: dict) -> dict:
        """Record that the training loop consumed `batch` (prefetched batches do not count)."""
        consumer, *position = batch.pop("position")
        self.positions[int(consumer)] = tuple(int(v) for v in position)
        self.batches += 1
        return batch

    # -- iteration -------------------------------------------------------------------------------
    def _consumer(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # DataLoader hands out batches from workers round-robin. After a resume its first batch comes
        # from worker 0, so worker 0 plays the consumer whose turn it was.
        return self.rank * self.slots + (worker + self.batches) % self.slots

    def plan(self, consumer: int, epoch: int) -> list[Unit]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        return [self.units[i] for i in order[consumer :: self.consumers]]

    def __iter__(self) -> Iterator[dict]:
        consumer = self._consumer()
        epoch, cursor, offset = self.positions.get(consumer, (0, 0, 0))
        pending: list[tuple[int, int, int, dict]] = []
        while True:
            plan = self.plan(consumer, epoch)
            while cursor < len(plan):
                unit = plan[cursor]
                length = unit.length(self.manifest)
                for position, raw in islice(unit_samples(self.manifest, unit, self.seed, epoch, self.shuffle_buffer), offset, None):
                    offset += 1
                    pending.append((epoch, unit.shard, position, raw))
                    if len(pending) == self.batch_size:
                        after = (epoch, cursor, offset) if offset < length else _next(epoch, cursor + 1, plan)
                        yield self._collate(pending, (consumer, *after))
                        pending = []
                cursor, offset = cursor + 1, 0
            epoch, cursor = epoch + 1, 0

    def _collate(self, pending: list, position: tuple) -> dict:
        return collate(pending, self.views, self.seed, self.manifest) | {"position": position}


def _next(epoch: int, cursor: int, plan: list) -> tuple[int, int, int]:
    return (epoch + 1, 0, 0) if cursor >= len(plan) else (epoch, cursor, 0)


def collate(pending: list[tuple[int, int, int, dict]], views: dict, seed: int, manifest: Manifest) -> dict:
    """Decode and augment a list of (epoch, shard, position, raw) into a batch of every view."""
    channels = manifest.shape[-1] if manifest.kind == "image" else 0
    outputs: dict[str, list] = {name: [] for name in views}
    labels, truths, keys, softs = [], [], [], []
    generator = torch.default_generator
    saved = generator.get_state()
    try:
        for epoch, shard, position, raw in pending:
            try:
                sample = decode_sample(raw, channels)
            except Exception as exc:
                raise ValueError(f"{manifest.url(manifest.shards[shard])}: cannot decode sample {raw.get('__key__')}: {exc}") from exc
            for index, (name, view) in enumerate(views.items()):
                generator.manual_seed(mix(seed, epoch, shard, position, index))
                outputs[name].append(view.per_sample(sample["input"]))
            labels.append(-1 if sample["label"] is None else sample["label"])
            truths.append(-1 if sample["truth"] is None else sample["truth"])
            keys.append(sample["key"])
            if sample["soft"] is not None:
                softs.append(sample["soft"])
    finally:
        generator.set_state(saved)
    batch = {
        "inputs": {name: views[name].batch(torch.stack(values)) for name, values in outputs.items()},
        "label": torch.tensor(labels, dtype=torch.long),
        "truth": torch.tensor(truths, dtype=torch.long),
        "keys": keys,
    }
    if softs:
        if len(softs) != len(pending):
            raise ValueError(f"{manifest.root}: some samples carry soft targets (soft.npy) and others do not")
        batch["soft"] = torch.stack(softs)
    return batch


class EvalStream(IterableDataset):
    """Every sample of a split exactly once across all ranks and workers, in shard order.

    Ranks take contiguous blocks of shards; with fewer shards than ranks, every rank reads all of
    them and keeps every world-th sample. A rank or worker may get nothing; callers reduce sums, so
    nobody waits for a batch that never comes.
    """

    def __init__(self, manifest: Manifest, batch_size: int, view, rank: int, world: int):
        self.manifest, self.batch_size, self.view = manifest, batch_size, view
        self.rank, self.world = rank, world

    def my_units(self) -> list[Unit]:
        n = len(self.manifest.shards)
        if n >= self.world:
            lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
            units = [Unit(s) for s in range(lo, hi)]
        else:
            units = [Unit(s, self.rank, self.world) for s in range(n)]
        info = get_worker_info()
        if info is not None:
            units = units[info.id :: info.num_workers]
        return units

    def __iter__(self) -> Iterator[dict]:
        channels = self.manifest.shape[-1] if self.manifest.kind == "image" else 0
        batch: list[dict] = []
        for unit in self.my_units():
            url = self.manifest.url(self.manifest.shards[unit.shard])
            for position, raw in enumerate(raw_samples(url)):
                if position % unit.parts != unit.part:
                    continue
                try:
                    batch.append(decode_sample(raw, channels))
                except Exception as exc:
                    raise ValueError(f"{url}: cannot decode sample {raw.get('__key__')}: {exc}") from exc
                if len(batch) == self.batch_size:
                    yield self._collate(batch)
                    batch = []
        if batch:
            yield self._collate(batch)

    def _collate(self, batch: list[dict]) -> dict:
        return {
            "inputs": {"plain": self.view.batch(torch.stack([self.view.per_sample(s["input"]) for s in batch]))},
            "label": torch.tensor([-1 if s["label"] is None else s["label"] for s in batch], dtype=torch.long),
            "truth": torch.tensor([-1 if s["truth"] is None else s["truth"] for s in batch], dtype=torch.long),
            "keys": [s["key"] for s in batch],
        }


def loader(stream: IterableDataset, workers: int) -> DataLoader:
    """Batches are made inside the stream; the DataLoader only adds worker processes."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )
