"""Streaming shards into batches: infinite training streams with a saved position, and finite
exactly-once streams for evaluation and inference.

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
* A consumer's position is therefore just (epoch, cursor in its unit list, samples read from the
  current unit): three integers, saved with every checkpoint. Resuming re-opens one unit and skips
  the samples already read before decoding them; nothing else is re-read.

Resuming with the same number of ranks and workers continues with exactly the samples the
uninterrupted run would have seen. Resuming with another number (preemptible machines come back in
other numbers) gathers what every old consumer had left of the epochs in progress, down to the
sample, deals it to the new consumers first (the *residual*), then plans the next epochs for the new
layout: within every epoch, no sample is skipped and none is repeated.

Bad data: a sample that does not decode is skipped, counted and reported on stderr; the stream
fails once more than `max_bad_fraction` of what a reader read was corrupt. A missing, truncated or
altered shard (bytes, sha256 and sample count are checked against the manifest in the same pass
that reads it) or a label out of range is a DataError naming the shard. Errors found in a
DataLoader worker travel to the training process inside a batch and are raised there as the same
one-line error.
"""

from __future__ import annotations

import functools
import math
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_ssl.data.shards.codec import decode_sample
from dist_ssl.data.shards.manifest import DataError, Manifest, check_local_shards
from dist_ssl.data.shards.tar import raw_samples
from dist_ssl.errors import UserError

_MASK = (1 << 64) - 1
DEFAULT_MAX_BAD_FRACTION = 0.01
_REPORTED_PER_READER = 20  # corrupt samples printed by one reader; the rest are only counted


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


@dataclass(frozen=True)
class Work:
    """Read `unit` as it is ordered in data epoch `epoch`, from its `start`-th sample on."""

    epoch: int
    unit: Unit
    start: int = 0


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


class SampleChecker:
    """Decodes raw samples for one reader (a rank's worker): a corrupt sample is skipped, counted and
    reported; bad labels and too many corrupt samples are DataErrors naming the shard."""

    def __init__(self, manifest: Manifest, max_bad_fraction: float, bad: int = 0, read: int = 0):
        self.manifest = manifest
        self.max_bad_fraction = max_bad_fraction
        self.bad, self.read = bad, read
        self.expected = tuple(manifest.input_shape)
        self.labeled = manifest.data.get("split") != "unlabeled"

    def __call__(self, raw: dict, url: str) -> dict | None:
        key = raw.get("__key__", "?")
        self.read += 1
        try:
            sample = decode_sample(raw, self.manifest.channels)
            if tuple(sample["input"].shape) != self.expected:
                raise ValueError(f"decoded shape {list(sample['input'].shape)}, the manifest says {list(self.expected)}")
        except Exception as exc:  # whatever a decoder raises for bad bytes
            self._corrupt(key, url, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return None
        num_classes = self.manifest.num_classes
        for name in ("label", "truth"):
            value = sample[name]
            if value is not None and not 0 <= value < num_classes:
                raise DataError(f"shard {url}: sample {key} has {name} {value}, outside 0..{num_classes - 1} ({num_classes} classes)")
        if sample["soft"] is not None and tuple(sample["soft"].shape) != (num_classes,):
            raise DataError(f"shard {url}: sample {key} has soft targets of shape {list(sample['soft'].shape)}, not [{num_classes}]")
        if self.labeled and sample["label"] is None:
            raise DataError(f"shard {url}: sample {key} of the {self.manifest.data.get('split')} split has no label")
        return sample

    def _corrupt(self, key: str, url: str, reason: str) -> None:
        self.bad += 1
        if self.bad <= _REPORTED_PER_READER:
            more = " (further corrupt samples of this reader are counted, not printed)" if self.bad == _REPORTED_PER_READER else ""
            print(f"dist-ssl: warning: skipped corrupt sample {key} in {url}: {reason}{more}", file=sys.stderr, flush=True)
        # The first corrupt sample is tolerated whenever some are (judged over at least 1/fraction samples).
        allowed = max(self.max_bad_fraction * self.read, 1.0) if self.max_bad_fraction > 0 else 0.0
        if self.bad > allowed:
            raise DataError(
                f"{self.bad} of {self.read} samples read from {self.manifest.root} were corrupt, more than "
                f"data.max_bad_fraction={self.max_bad_fraction} allows (last: {key} in {url}: {reason})"
            )


def _carry_errors(batches: Iterator[dict]) -> Iterator[dict]:
    """In a DataLoader worker, a DataError becomes a batch that says so (see `Batches`)."""
    try:
        yield from batches
    except DataError as exc:
        if get_worker_info() is None:
            raise
        yield {"error": str(exc)}


@dataclass
class Layout:
    """Who reads what: `consumers` readers, the units of the regular epochs (from `base_epoch` on) and
    the residual work left by an earlier layout, read first (as phase `base_epoch - 1`)."""

    consumers: int
    units: list[Unit]
    seed: int
    base_epoch: int = 0
    residual: tuple[Work, ...] = ()

    def plan(self, consumer: int, phase: int) -> list[Work]:
        if phase < self.base_epoch:
            return list(self.residual[consumer :: self.consumers]) if phase == self.base_epoch - 1 else []
        order = np.random.default_rng([self.seed, phase]).permutation(len(self.units))
        return [Work(phase, self.units[i]) for i in order[consumer :: self.consumers]]

    def start(self) -> tuple[int, int, int]:
        """Where a consumer that has not read anything yet begins."""
        return (self.base_epoch - 1, 0, 0) if self.residual else (self.base_epoch, 0, 0)


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
        state: dict | list[dict] | None = None,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ):
        self.manifest = manifest
        self.batch_size = batch_size
        self.views = views
        self.rank, self.world, self.workers = rank, world, workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.max_bad_fraction = max_bad_fraction
        self.slots = max(workers, 1)
        self.consumers = world * self.slots
        if manifest.num_samples < self.consumers:
            raise UserError(
                f"split {manifest.root} has {manifest.num_samples} samples, fewer than the "
                f"{world} ranks x {self.slots} workers that read it"
            )
        check_local_shards(manifest)
        self.offsets = np.cumsum([0] + [shard.num_samples for shard in manifest.shards]).tolist()  # shard -> its first sample's index
        self.layout = Layout(self.consumers, make_units(len(manifest.shards), self.consumers), seed)
        self.positions: dict[int, tuple[int, int, int]] = {}
        self.counts: dict[int, tuple[int, int]] = {}  # consumer -> (corrupt samples, samples read)
        self.carried = (0, 0)  # counts of the readers of an earlier layout (rank 0 keeps them)
        self.batches = 0  # batches this rank has consumed since the layout was set
        if state:
            self.load_state_dict(state)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "world": self.world,
            "workers": self.slots,
            "rank": self.rank,
            "batches": self.batches,
            "positions": {int(c): list(p) for c, p in self.positions.items()},
            "counts": {int(c): list(n) for c, n in self.counts.items()},
            "carried": list(self.carried),
            "base_epoch": self.layout.base_epoch,
            "residual": [[w.epoch, w.unit.shard, w.unit.part, w.unit.parts, w.start] for w in self.layout.residual],
        }

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """The rank's own state (same layout), or the states of every rank of the run that saved them
        (any layout: with another one, the epochs in progress are redistributed)."""
        if isinstance(state, dict):
            if state["world"] != self.world or state["workers"] != self.slots:
                raise UserError(
                    f"cannot resume the stream of {self.manifest.root} from one rank's state: it was read by "
                    f"{state['world']} ranks x {state['workers']} workers, this run has {self.world} x {self.slots}"
                )
            states = [state]
        else:
            states = sorted(state, key=lambda s: s.get("rank", 0))
        first = states[0]
        residual = tuple(Work(e, Unit(s, p, n), start) for e, s, p, n, start in first.get("residual", []))
        old_consumers = first["world"] * first["workers"]
        old = Layout(old_consumers, make_units(len(self.manifest.shards), old_consumers), self.seed, first.get("base_epoch", 0), residual)
        positions = {int(c): tuple(p) for s in states for c, p in s["positions"].items()}
        counts = {int(c): tuple(n) for s in states for c, n in s.get("counts", {}).items()}
        if first["world"] == self.world and first["workers"] == self.slots:
            mine = next((s for s in states if s.get("rank", self.rank) == self.rank), None)
            if mine is None or len(states) not in (1, self.world):
                raise UserError(f"cannot resume the stream of {self.manifest.root}: the saved states do not cover rank {self.rank}")
            self.layout = old
            self.batches = int(mine["batches"])
            self.positions = {c: p for c, p in positions.items() if c // self.slots == self.rank}
            self.counts = {c: n for c, n in counts.items() if c // self.slots == self.rank}
            self.carried = tuple(mine.get("carried", (0, 0)))
            return
        if len(states) != first["world"]:
            raise UserError(
                f"cannot resume the stream of {self.manifest.root} on {self.world} ranks x {self.slots} workers: "
                f"that needs the states of all {first['world']} ranks that saved it, {len(states)} given"
            )
        self.layout = self._redistribute(old, positions)
        self.positions, self.counts, self.batches = {}, {}, 0
        if self.rank == 0:  # the old readers' counts, reported once
            totals = np.array([s.get("carried", (0, 0)) for s in states] + list(counts.values())).sum(axis=0)
            self.carried = (int(totals[0]), int(totals[1]))

    def restore(self, own: dict | None, every_rank) -> None:
        """From a checkpoint: this rank's own saved position when the layout (ranks x workers) is
        unchanged, else what every saved rank had left (`every_rank()` gives their states), redistributed."""
        same_layout = own is not None and own["world"] == self.world and own["workers"] == self.slots
        self.load_state_dict(own if same_layout else every_rank())

    def _redistribute(self, old: Layout, positions: dict[int, tuple[int, int, int]]) -> Layout:
        """What every old consumer had left of the epochs in progress, as residual work of a new layout."""
        where = {c: positions.get(c, old.start()) for c in range(old.consumers)}
        last = max(phase for phase, _, _ in where.values())
        left: list[Work] = []
        for consumer, (phase, cursor, offset) in where.items():
            while phase <= last:
                for work in old.plan(consumer, phase)[cursor:]:
                    start = max(work.start, offset)
                    if start < work.unit.length(self.manifest):
                        left.append(Work(work.epoch, work.unit, start))
                    offset = 0
                phase, cursor, offset = phase + 1, 0, 0
        return Layout(self.consumers, make_units(len(self.manifest.shards), self.consumers), self.seed, last + 1, tuple(left))

    def observe(self, batch: dict) -> dict:
        """Record that the training loop consumed `batch` (prefetched batches do not count)."""
        consumer, *position = batch.pop("position")
        self.positions[int(consumer)] = tuple(int(v) for v in position)
        self.counts[int(consumer)] = tuple(int(v) for v in batch.pop("counts"))
        self.batches += 1
        return batch

    @property
    def corrupt_samples(self) -> int:
        """Corrupt samples skipped by this rank's readers in consumed batches, over all resumptions."""
        return self.carried[0] + sum(bad for bad, _ in self.counts.values())

    @property
    def samples_read(self) -> int:
        return self.carried[1] + sum(read for _, read in self.counts.values())

    # -- iteration -------------------------------------------------------------------------------
    def _consumer(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # DataLoader hands out batches from workers round-robin. After a resume its first batch comes
        # from worker 0, so worker 0 plays the consumer whose turn it was.
        return self.rank * self.slots + (worker + self.batches) % self.slots

    def plan(self, consumer: int, epoch: int) -> list[Work]:
        return self.layout.plan(consumer, epoch)

    def __iter__(self) -> Iterator[dict]:
        return _carry_errors(self._batches())

    def _batches(self) -> Iterator[dict]:
        consumer = self._consumer()
        phase, cursor, offset = self.positions.get(consumer, self.layout.start())
        checker = SampleChecker(self.manifest, self.max_bad_fraction, *self.counts.get(consumer, (0, 0)))
        pending: list[tuple[int, int, int, dict]] = []
        while True:
            plan = self.plan(consumer, phase)
            while cursor < len(plan):
                work = plan[cursor]
                offset = max(offset, work.start)
                length = work.unit.length(self.manifest)
                url = self.manifest.url(self.manifest.shards[work.unit.shard])
                samples = unit_samples(self.manifest, work.unit, self.seed, work.epoch, self.shuffle_buffer)
                for position, raw in islice(samples, offset, None):
                    offset += 1
                    sample = checker(raw, url)
                    if sample is not None:
                        sample["index"] = self.offsets[work.unit.shard] + raw["__index__"]
                        pending.append((work.epoch, work.unit.shard, position, sample))
                    if len(pending) == self.batch_size:
                        after = (phase, cursor, offset) if offset < length else _next(phase, cursor + 1, plan)
                        yield self._collate(pending, (consumer, *after), (checker.bad, checker.read))
                        pending = []
                cursor, offset = cursor + 1, 0
            phase, cursor = phase + 1, 0

    def _collate(self, pending: list, position: tuple, counts: tuple) -> dict:
        return collate(pending, self.views, self.seed) | {"position": position, "counts": counts}


def _next(phase: int, cursor: int, plan: list) -> tuple[int, int, int]:
    return (phase + 1, 0, 0) if cursor >= len(plan) else (phase, cursor, 0)


def collate(pending: list[tuple[int, int, int, dict]], views: dict, seed: int) -> dict:
    """A batch of (epoch, shard, position, decoded sample) and each view's randomness.

    Each sample's view `index` runs under torch's default generator seeded by (seed, epoch, shard,
    position, index). Reference views (`data.transforms`) are computed here, one sample at a time:
    `inputs`. Batched views (`data.device_views`) only draw their parameters here: the batch
    carries the decoded samples (`decoded`, uint8 images) and each view's `plans`, and the training
    device applies them (`device_views.on_device`)."""
    batched = any(hasattr(view, "draw") for view in views.values())
    outputs: dict[str, list] = {name: [] for name in views}
    generator = torch.default_generator
    saved = generator.get_state()
    try:
        for epoch, shard, position, sample in pending:
            for index, (name, view) in enumerate(views.items()):
                generator.manual_seed(mix(seed, epoch, shard, position, index))
                outputs[name].append(view.draw() if batched else view.per_sample(sample["input"]))
    finally:
        generator.set_state(saved)
    batch = {
        "label": torch.tensor([-1 if s["label"] is None else s["label"] for *_, s in pending], dtype=torch.long),
        "truth": torch.tensor([-1 if s["truth"] is None else s["truth"] for *_, s in pending], dtype=torch.long),
        "epoch": torch.tensor([epoch for epoch, *_ in pending], dtype=torch.long),
        "keys": [s["key"] for *_, s in pending],
        "index": torch.tensor([s.get("index", -1) for *_, s in pending], dtype=torch.long),  # in the split (TrainStream)
    }
    if batched:
        batch["decoded"] = torch.stack([s["input"] for *_, s in pending])
        batch["plans"] = {name: views[name].plan(values) for name, values in outputs.items()}
    else:
        batch["inputs"] = {name: views[name].batch(torch.stack(values)) for name, values in outputs.items()}
    softs = [s["soft"] for *_, s in pending if s["soft"] is not None]
    if softs:  # a split of soft pseudo-labels (dist-ssl select --soft): the class probabilities
        if len(softs) != len(pending):
            raise DataError("some samples of the batch carry soft targets (soft.npy) and others do not")
        batch["soft"] = torch.stack(softs)
    return batch


class EvalStream(IterableDataset):
    """Every sample of a split exactly once across all ranks and workers, in shard order.

    Ranks take contiguous blocks of shards; with fewer shards than ranks, every rank reads all of
    them and keeps every world-th sample. A rank or worker may get nothing; callers reduce sums, so
    nobody waits for a batch that never comes. Corrupt samples are skipped (callers see fewer
    samples than the manifest lists).
    """

    def __init__(self, manifest: Manifest, batch_size: int, view, rank: int, world: int, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION):
        self.manifest, self.batch_size, self.view = manifest, batch_size, view
        self.rank, self.world = rank, world
        self.max_bad_fraction = max_bad_fraction
        check_local_shards(manifest)

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
        return _carry_errors(self._batches())

    def _batches(self) -> Iterator[dict]:
        checker = SampleChecker(self.manifest, self.max_bad_fraction)
        batch: list[dict] = []
        for unit in self.my_units():
            shard = self.manifest.shards[unit.shard]
            url = self.manifest.url(shard)
            for position, raw in enumerate(raw_samples(url, shard)):
                if position % unit.parts != unit.part:
                    continue
                sample = checker(raw, url)
                if sample is None:
                    continue
                batch.append(sample)
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


def _obey_only_the_loader(loader_pid: int, worker_id: int) -> None:
    """SLURM signals every process of a job step and torchrun a rank's whole process group, workers
    included. torch's worker dies on a SIGTERM from anyone but its parent, and the training process
    then fails at once instead of checkpointing at the next step (engine/preemption.py).

    Here SIGTERM and SIGUSR1 are blocked in the worker and a thread takes them with sigwaitinfo,
    which tells who sent them: the SIGTERM of the process that owns the DataLoader (its shutdown)
    ends the worker as before, everyone else's is left to the training process. Programs a worker
    starts inherit the blocked mask (a `pipe:` URL's curl then ends by SIGPIPE or SIGKILL)."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS: keep torch's behaviour
        return
    stop_signals = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo(stop_signals)
            if info.si_signo == signal.SIGTERM and info.si_pid == loader_pid:
                os._exit(0)  # what torch's own handler does for its parent

    threading.Thread(target=wait, name="stop-signals", daemon=True).start()


class Batches:
    """A DataLoader's batches, with a DataError found in a worker raised here as the same one-line
    error (DataLoader itself would re-raise it wrapped in a multi-line traceback text)."""

    def __init__(self, dataloader: DataLoader):
        self.dataloader = dataloader

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.dataloader)
        while (batch := next(batches, None)) is not None:
            if "error" in batch:
                # The worker processes go now, not whenever the traceback that holds this frame is freed.
                del batches
                raise DataError(batch["error"])
            yield batch


def worker_context():
    """How DataLoader workers start: from a forkserver, not by forking the rank.

    A rank has threads (the run lock's heartbeat, the launcher watchdog, TensorBoard's writer, the
    queue feeders of its other loaders), and forking a process with threads can deadlock the child:
    on CPython 3.11 a child forked while another thread holds the interpreter's thread-list lock
    waits for it forever inside os.fork() (seen here: an evaluation worker stuck in
    `_PyThreadState_DeleteExcept`, its rank waiting for its first batch). The forkserver is one
    single-threaded process per rank, started on first use with the modules a worker needs already
    imported; every worker is forked from it. Where there is no forkserver (macOS, Windows), the
    platform's default."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "dist_ssl.data.streams", "dist_ssl.data.transforms"])
    return context


def loader(stream: IterableDataset, workers: int) -> Batches:
    """Batches are made inside the stream; the DataLoader only adds worker processes (one iterator
    per loader: an infinite training stream, or one pass of evaluation, so workers never persist)."""
    return Batches(DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        multiprocessing_context=worker_context() if workers > 0 else None,
        worker_init_fn=functools.partial(_obey_only_the_loader, os.getpid()) if workers > 0 else None,
        # Its workers' base seed comes from a generator of its own: drawn from the global one when the
        # iterator starts (lazily, at the first batch), it would shift the training RNG (dropout,
        # sampled pseudo-labels) of a resumed run against the uninterrupted one. Samples are seeded
        # by position anyway (collate).
        generator=torch.Generator(),
    ))
