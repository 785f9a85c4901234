"""Virtual consumers: which samples make global batch k, the same on any number of GPUs and workers.

A training stream is planned for a fixed number V of *virtual consumers* (`data.virtual_consumers`),
never for the processes and DataLoader workers a run happens to get:

* A stream reads *units*: whole shards, or, with fewer shards than V, strided parts of shards (every
  virtual consumer always has data). In data epoch `e` the shards are permuted by (seed, e) and each
  shard is expanded into its parts; the epochs' unit lists are dealt round-robin to the consumers as
  one sequence. A shard's parts thus go to neighbouring consumers, which one worker usually serves
  and reads in one pass over the shard (`ShardPasses`), with its share of the shuffle buffer.
* Global batch `k` is cut from the virtual consumers in their order (`share`): V splits into
  g = gcd(V, B) blocks of V/g consumers; each block gives B/g samples per batch, dealt round-robin
  among its consumers, so every consumer reads at the same pace.
* Rank r of W serves the consumers [rV/W, (r+1)V/W) (`served`): its share of the global batch is the
  slice [rB/W, (r+1)B/W). Its workers serve contiguous groups of those consumers; each worker yields
  its piece of every batch and the rank joins them in worker order (DataLoader's round-robin).

So global batch k holds the same samples in the same order on any layout whose world size divides
g, and a sample's augmentation is seeded by (seed, epoch, shard, position) alone. Resuming on another
layout only moves consumers between ranks and workers: their positions carry over unchanged.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from dist_ssl.data.shards.manifest import DataError, Manifest
from dist_ssl.data.shards.tar import raw_samples
from dist_ssl.errors import UserError

DEFAULT_VIRTUAL_CONSUMERS = 64  # divisible by 1, 2, 4, 8, 16, 32 and 64 processes x workers
_MASK = (1 << 64) - 1


def mix(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps): seeds that differ for every (seed, epoch, ...).

    Why not numpy's SeedSequence: it runs once per view of every sample, and SeedSequence costs
    26 us a call against 5 us here (measured); splitmix64 is the standard 64-bit seed mixer."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state + (value & _MASK) + 0x9E3779B97F4A7C15) & _MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        state = z ^ (z >> 31)
    return state >> 1


def share(consumer: int, batch: int, consumers: int, batch_size: int) -> int:
    """How many samples virtual `consumer` gives to global batch `batch` (of `batch_size`)."""
    blocks = math.gcd(consumers, batch_size)
    size, per_batch = consumers // blocks, batch_size // blocks
    slot = consumer % size

    def dealt(slots: int) -> int:  # of the block's first `slots` samples, how many are this consumer's
        return max(slots - slot + size - 1, 0) // size

    return dealt((batch + 1) * per_batch) - dealt(batch * per_batch)


def served(consumers: int, rank: int, world: int, worker: int = 0, workers: int = 1) -> range:
    """The virtual consumers a rank's worker serves: contiguous, in worker order within the rank's."""
    per_rank = consumers // world
    first = rank * per_rank
    return range(first + worker * per_rank // workers, first + (worker + 1) * per_rank // workers)


def check_layout(root, consumers: int, world: int, workers: int, batch_size: int) -> None:
    """One clear error for a layout that cannot serve the virtual consumers (`batch_size` is global)."""
    blocks = math.gcd(consumers, batch_size)
    if blocks % world:
        valid = [w for w in range(1, blocks + 1) if blocks % w == 0]
        raise UserError(
            f"{world} processes cannot share the stream of {root}: its global batches of {batch_size} are cut from "
            f"data.virtual_consumers={consumers} virtual consumers, which {', '.join(map(str, valid))} processes can "
            f"share evenly (the divisors of gcd({consumers}, {batch_size})); another data.virtual_consumers starts another order"
        )
    if workers > consumers // world:
        raise UserError(
            f"data.workers={workers} is more than the {consumers // world} virtual consumers each of the {world} processes "
            f"serves in the stream of {root}: use 0 to {consumers // world} workers (or more data.virtual_consumers)"
        )


@dataclass(frozen=True)
class Unit:
    shard: int
    part: int = 0
    parts: int = 1

    def length(self, manifest: Manifest) -> int:
        return len(range(self.part, manifest.shards[self.shard].num_samples, self.parts))


def make_units(num_shards: int, consumers: int, grouped: bool = True) -> list[Unit]:
    """Whole shards, or each shard in `parts` strided parts when there are fewer shards than consumers:
    (grouped) the smallest divisor of `consumers` that gives each one a unit, so a shard's parts fill
    whole groups of neighbouring consumers; (before virtual consumers) the smallest number that does."""
    parts = 1 if num_shards >= consumers else math.ceil(consumers / num_shards)
    if grouped:
        parts = next(p for p in range(parts, consumers + 1) if consumers % p == 0)
    return [Unit(s, j, parts) for s in range(num_shards) for j in range(parts)]


@dataclass(frozen=True)
class Work:
    """Read `unit` as it is ordered in data epoch `epoch` by a shuffle buffer of `buffer` samples, from
    its `start`-th sample on."""

    epoch: int
    unit: Unit
    start: int = 0
    buffer: int = 1


@dataclass
class Layout:
    """Who reads what: `consumers` readers, the units of the regular epochs (from `base_epoch` on) and
    the residual work left by an earlier layout, read first (as phase `base_epoch - 1`); `buffer` is
    the shuffle buffer of each pass over a shard in the regular epochs (`pass_buffer`).

    `grouped`: a shard's parts go to neighbouring consumers (shards are permuted, then expanded);
    False is the order of checkpoints written before virtual consumers (units permuted one by one),
    kept to redistribute what such a checkpoint had left."""

    consumers: int
    units: list[Unit]
    seed: int
    base_epoch: int = 0
    residual: tuple[Work, ...] = ()
    grouped: bool = True
    buffer: int = 1
    _orders: dict = field(default_factory=dict, repr=False, compare=False)

    def plan(self, consumer: int, phase: int) -> list[Work]:
        if phase < self.base_epoch:
            return list(self.residual[consumer :: self.consumers]) if phase == self.base_epoch - 1 else []
        order = self._order(phase)[0]
        return [Work(phase, unit, 0, self.buffer) for unit in order[self._first(consumer, phase) :: self.consumers]]

    def _first(self, consumer: int, phase: int) -> int:
        """Where a consumer's units of epoch `phase` begin. Grouped, the epochs' unit lists are dealt
        as one sequence (consumer c takes every V-th unit of epoch 0, then of epoch 1, ...): with a
        number of units that V does not divide, who gets one unit more changes every epoch, and no
        consumer falls behind the others epoch after epoch."""
        if not self.grouped:
            return consumer
        return (consumer - phase * len(self.units)) % self.consumers

    def holders(self, epoch: int, shard: int) -> list[tuple[int, int, Unit]]:
        """(consumer, cursor, unit) of every part of `shard` in regular epoch `epoch`."""
        order, first = self._order(epoch)
        parts, shift = self.units[0].parts, epoch * len(self.units)
        found = []
        for i in range(first[shard], first[shard] + parts):
            consumer = (i + shift) % self.consumers
            found.append((consumer, (i - self._first(consumer, epoch)) // self.consumers, order[i]))
        return found

    def _order(self, phase: int) -> tuple[list[Unit], np.ndarray | None]:
        """The units of epoch `phase` in reading order, and (grouped) where each shard's parts begin."""
        cached = self._orders.get(phase)
        if cached is None:
            rng = np.random.default_rng([self.seed, phase])
            first = None
            if self.grouped and self.units:
                parts = self.units[0].parts
                shards = rng.permutation(len(self.units) // parts)
                turns = rng.integers(parts, size=len(shards))  # which consumer gets a shard's empty parts changes
                order = [Unit(int(s), int(j + turn) % parts, parts) for s, turn in zip(shards, turns) for j in range(parts)]
                first = np.empty(len(shards), np.int64)
                first[shards] = np.arange(len(shards)) * parts
            else:
                order = [self.units[i] for i in rng.permutation(len(self.units))]
            # Consumers of a tiny split skip many epochs with nothing for them: keep many small orders.
            if len(self._orders) >= max(8, (1 << 16) // max(len(order), 1)):
                self._orders.pop(min(self._orders))
            cached = self._orders[phase] = (order, first)
        return cached

    def start(self) -> tuple[int, int, int]:
        """Where a consumer that has not read anything yet begins."""
        return (self.base_epoch - 1, 0, 0) if self.residual else (self.base_epoch, 0, 0)


def pass_buffer(shuffle_buffer: int, consumers: int, parts: int) -> int:
    """The shuffle buffer of one pass over a shard: about consumers/parts shards are read at a time,
    and together they hold `shuffle_buffer` samples (as one reader did before virtual consumers), not
    64 times as many."""
    return max(1, shuffle_buffer * parts // consumers)


def unit_samples(manifest: Manifest, unit: Unit, seed: int, epoch: int, shuffle_buffer: int) -> Iterator[tuple[int, dict]]:
    """(position in the shard's shuffled order, raw sample) for the samples of `unit` in `epoch`."""
    import webdataset as wds

    shard = manifest.shards[unit.shard]
    samples = _numbered(raw_samples(manifest.url(shard), shard))
    rng = random.Random(mix(seed, epoch, unit.shard))
    shuffled = wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng)(samples)
    for position, raw in enumerate(shuffled):
        if position % unit.parts == unit.part:
            yield position, raw


def _numbered(samples: Iterator[dict]) -> Iterator[dict]:
    """Each raw sample with `__index__`, its place in the shard's file, taken before shuffling: with
    the shard's offset in the manifest, the sample's index in its split, the same in every epoch,
    layout and rank (FlexMatch keeps per-sample state by it)."""
    for index, raw in enumerate(samples):
        raw["__index__"] = index
        yield raw


class _Pass:
    """One pass over a shard's shuffled order in one epoch, handing each registered part its samples
    (from the part's `first`-th on); the samples of other parts are dropped undecoded."""

    def __init__(self, samples: Iterator[tuple[int, dict]], parts: int, url: str):
        self.samples, self.parts, self.url = samples, parts, url
        self.queues: dict[int, deque] = {}
        self.first: dict[int, int] = {}
        self.left: dict[int, int] = {}
        self.next_position = 0

    def add(self, part: int, first: int, length: int) -> bool:
        """Register a part; False when it is registered already or its samples have gone by."""
        if part in self.queues or first * self.parts + part < self.next_position:
            return False
        self.queues[part], self.first[part], self.left[part] = deque(), first, length - first
        return True

    def take(self, part: int) -> tuple[int, dict]:
        queue = self.queues[part]
        while not queue:
            item = next(self.samples, None)
            if item is None:
                raise DataError(f"shard {self.url} ended before its part {part} of {self.parts} did")
            position = item[0]
            self.next_position = position + 1
            owner = position % self.parts
            if owner in self.queues and position // self.parts >= self.first[owner]:
                self.queues[owner].append(item)
        self.left[part] -= 1
        return queue.popleft()

    @property
    def finished(self) -> bool:
        return not any(self.left.values())


class ShardPasses:
    """A worker's reads: the parts of one shard in one epoch that its consumers read at about the same
    time come from one pass over the shard (a shard split into P parts is read once, not P times).

    `open(work, start, holders)` returns a function giving the unit's next (position, raw sample);
    `holders(epoch, shard)` lists the (unit, first sample) of the parts this worker's consumers are
    about to read, registered when a pass opens."""

    def __init__(self, manifest: Manifest, seed: int):
        self.manifest, self.seed = manifest, seed
        self.passes: dict[tuple[int, int, int], _Pass] = {}

    def _new(self, work: Work) -> _Pass:
        samples = unit_samples(self.manifest, Unit(work.unit.shard), self.seed, work.epoch, work.buffer)
        return _Pass(samples, work.unit.parts, self.manifest.url(self.manifest.shards[work.unit.shard]))

    def open(self, work: Work, start: int, holders: Callable[[int, int], list]) -> Callable[[], tuple[int, dict]]:
        key, unit = (work.epoch, work.unit.shard, work.buffer), work.unit
        length = unit.length(self.manifest)
        shared = self.passes.get(key)
        if shared is None and unit.parts > 1:
            shared = self.passes[key] = self._new(work)
            for other, first in holders(work.epoch, work.unit.shard):
                shared.add(other.part, first, other.length(self.manifest))
        if shared is not None:
            if unit.part in shared.queues and (shared.first[unit.part], shared.left[unit.part]) != (start, length - start):
                shared.left[unit.part] = 0  # registered from another position (never expected): read it alone
                shared.queues.pop(unit.part)
            if unit.part in shared.queues or shared.add(unit.part, start, length):
                return lambda: self._take(key, shared, unit.part)
        alone = self._new(work)
        alone.add(unit.part, start, length)
        return lambda: alone.take(unit.part)

    def _take(self, key: tuple[int, int, int], shared: _Pass, part: int) -> tuple[int, dict]:
        item = shared.take(part)
        if shared.finished and self.passes.get(key) is shared:
            del self.passes[key]
        return item
