"""Streaming shards into batches: infinite training streams with a saved position, and finite
exactly-once streams for evaluation and inference.

Why not webdataset's `split_by_node`/`split_by_worker` + `shuffle`: their order depends on the rank
and on an RNG that is never saved, so a resumed run cannot continue where it stopped, and a rank
with no shard silently yields nothing. We keep webdataset for what it is good at (opening local,
http and `pipe:` URLs, expanding tars into samples, the shuffle buffer) and plan the order ourselves:

* A stream is planned for a fixed number of *virtual consumers* (`data/consumers.py`), never for
  the ranks and workers of a run: the units (shards, or strided parts of shards) each virtual
  consumer reads in every data epoch, and the samples it gives to each global batch. A rank serves
  a contiguous range of them; each of its DataLoader workers a contiguous group of that range, and
  yields its piece of every batch (`TrainStream.join` puts a rank's pieces together).
* Within a shard, the sample order is a shuffle buffer seeded by (seed, e, shard) (a full
  permutation when the shard fits in the buffer). A sample's augmentation is seeded by
  (seed, e, shard, position), so it does not depend on workers, resumption or rank.
* A virtual consumer's position is therefore just (epoch, cursor in its unit list, samples read
  from the current unit): three integers, saved with every checkpoint with the number of global
  batches consumed. Resuming re-opens one unit per consumer and skips the samples already read
  before decoding them; nothing else is re-read.

Resuming on any number of ranks and workers that can share the virtual consumers continues with
exactly the global batches the uninterrupted run would have seen: the consumers' positions move to
the ranks that serve them now. A checkpoint of another number of virtual consumers (or from before
them) is redistributed: what every old consumer had left of the epochs in progress, down to the
sample, is dealt first (the *residual*), then the next epochs are planned anew: within every epoch,
no sample is skipped and none is repeated, but the order differs from the uninterrupted run.

Bad data: a sample that does not decode is skipped, counted and reported on stderr; the stream
fails once more than `max_bad_fraction` of what a reader read was corrupt. A missing, truncated or
altered shard (bytes, sha256 and sample count are checked against the manifest in the same pass
that reads it) or a label out of range is a DataError naming the shard. Errors found in a
DataLoader worker travel to the training process inside a batch and are raised there as the same
one-line error.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dist_ssl.data.consumers import (  # noqa: F401  (Unit, unit_samples, mix: part of the streams' interface)
    DEFAULT_VIRTUAL_CONSUMERS,
    Layout,
    ShardPasses,
    Unit,
    Work,
    check_layout,
    make_units,
    mix,
    pass_buffer,
    served,
    share,
    unit_samples,
)
from dist_ssl.data.shards.codec import decode_sample
from dist_ssl.data.shards.manifest import DataError, Manifest, check_local_shards
from dist_ssl.data.shards.tar import raw_samples
from dist_ssl.errors import UserError

DEFAULT_MAX_BAD_FRACTION = 0.01
_REPORTED_PER_READER = 20  # corrupt samples printed by one reader; the rest are only counted


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


@dataclass(frozen=True)
class Piece:
    """A worker's piece of a batch, whose small tensors travel as numpy arrays inside the pickle: a
    tensor crosses processes as a shared-memory file and a socket message (about 0.3 ms each,
    measured), which for pieces of half a batch cost a tenth of the reading speed."""

    fields: dict


def _small_as_numpy(value, back: bool = False):
    if back and isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if not back and isinstance(value, torch.Tensor) and value.numel() <= 1 << 16:
        return value.numpy()
    if isinstance(value, dict):
        return {k: _small_as_numpy(v, back) for k, v in value.items()}
    if isinstance(value, list) and value and not isinstance(value[0], str):
        return [_small_as_numpy(v, back) for v in value]
    return value


@dataclass(frozen=True)
class Positions:
    """(consumer, phase, cursor, offset, corrupt, read) of the virtual consumers a batch came from: one
    object, which DataLoader's conversion passes through instead of walking every number."""

    entries: tuple


class _Reader:
    """One virtual consumer inside a worker: its position (phase, unit cursor, samples read from the
    unit) and counts (corrupt, read), and the samples it gives to each batch."""

    def __init__(self, stream: "TrainStream", consumer: int, passes: ShardPasses, checker: "SampleChecker"):
        self.stream, self.consumer, self.passes, self.checker = stream, consumer, passes, checker
        self.phase, self.cursor, self.offset = stream.positions.get(consumer, stream.layout.start())
        self.bad, self.read = stream.counts.get(consumer, (0, 0))
        self.next_sample = None  # the open unit's reader
        self.plan: list[Work] | None = None  # of the current phase

    def about_to_read(self, epoch: int, cursor: int) -> int | None:
        """The first sample this consumer will read of its unit at (epoch, cursor), when that unit is
        the one it opens next or the one after (a shared pass keeps the unit's samples until then)."""
        if self.phase == epoch and cursor == self.cursor and self.next_sample is None:
            return self.offset
        if (self.phase == epoch and cursor == self.cursor + 1) or (self.phase == epoch - 1 and cursor == 0):
            return 0
        return None

    def take(self, count: int, pending: list, holders) -> None:
        manifest = self.stream.manifest
        while count > 0:
            if self.plan is None:
                self.plan = self.stream.layout.plan(self.consumer, self.phase)
            plan = self.plan
            if self.cursor >= len(plan):
                self.phase, self.cursor, self.offset, self.plan = self.phase + 1, 0, 0, None
                continue
            work = plan[self.cursor]
            if self.next_sample is None:
                length = work.unit.length(manifest)
                self.offset = max(self.offset, work.start)
                if self.offset >= length:  # an empty unit (or part) is skipped without opening its shard
                    self.cursor, self.offset = self.cursor + 1, 0
                    continue
                self.next_sample = self.passes.open(work, self.offset, holders)
                self.length, self.url = length, manifest.url(manifest.shards[work.unit.shard])
            position, raw = self.next_sample()
            self.offset += 1
            if self.offset >= self.length:
                self.next_sample, self.cursor, self.offset = None, self.cursor + 1, 0
            bad = self.checker.bad
            sample = self.checker(raw, self.url)
            self.bad, self.read = self.bad + self.checker.bad - bad, self.read + 1
            if sample is not None:
                sample["index"] = self.stream.offsets[work.unit.shard] + raw["__index__"]
                pending.append((work.epoch, work.unit.shard, position, sample))
                count -= 1


class TrainStream(IterableDataset):
    """An infinite stream of one rank's shares of the global batches (`data/consumers.py`); each batch
    carries its number and the positions of the virtual consumers it came from."""

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
        virtual_consumers: int = DEFAULT_VIRTUAL_CONSUMERS,
    ):
        self.manifest = manifest
        self.batch_size = batch_size  # this rank's share
        self.views = views
        self.rank, self.world, self.workers = rank, world, workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.max_bad_fraction = max_bad_fraction
        self.slots = max(workers, 1)
        self.virtual = virtual_consumers
        if manifest.num_samples == 0:
            raise UserError(f"split {manifest.root} has no samples to train on")
        check_layout(manifest.root, virtual_consumers, world, workers, batch_size * world)
        check_local_shards(manifest)
        self.offsets = np.cumsum([0] + [shard.num_samples for shard in manifest.shards]).tolist()  # shard -> its first sample's index
        units = make_units(len(manifest.shards), virtual_consumers)
        self.pass_buffer = pass_buffer(shuffle_buffer, virtual_consumers, units[0].parts)
        self.layout = Layout(virtual_consumers, units, seed, buffer=self.pass_buffer)
        self.positions: dict[int, tuple[int, int, int]] = {}  # of this rank's virtual consumers
        self.counts: dict[int, tuple[int, int]] = {}  # virtual consumer -> (corrupt samples, samples read)
        self.carried = (0, 0)  # counts of the readers of an earlier order (rank 0 keeps them)
        self.batches = 0  # global batches consumed: the number of the next one
        self.notice: str | None = None  # what a resume changed, for the run's log
        if state:
            self.load_state_dict(state)

    @property
    def pieces_per_batch(self) -> int:
        """DataLoader items that make one batch: every worker gives its piece of every batch."""
        return self.slots if self.workers > 0 else 1

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "virtual_consumers": self.virtual,
            "world": self.world,
            "workers": self.slots,
            "rank": self.rank,
            "batches": self.batches,
            "positions": {int(c): list(p) for c, p in self.positions.items()},
            "counts": {int(c): list(n) for c, n in self.counts.items()},
            "carried": list(self.carried),
            "base_epoch": self.layout.base_epoch,
            "residual": [[w.epoch, w.unit.shard, w.unit.part, w.unit.parts, w.start, w.buffer] for w in self.layout.residual],
        }

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """The rank's own state (same layout), or the states of every rank of the run that saved them
        (any layout: the virtual consumers' positions move to the ranks that serve them now)."""
        if isinstance(state, dict):
            if state["world"] != self.world or state["workers"] != self.slots or state.get("virtual_consumers") != self.virtual:
                raise UserError(
                    f"cannot resume the stream of {self.manifest.root} from one rank's state: it was read by "
                    f"{state['world']} ranks x {state['workers']} workers, this run has {self.world} x {self.slots}"
                )
            states = [state]
        else:
            states = sorted(state, key=lambda s: s.get("rank", 0))
        first = states[0]
        same_layout = first["world"] == self.world and first["workers"] == self.slots
        if len(states) != first["world"] and not (same_layout and len(states) == 1 and first.get("rank", self.rank) == self.rank):
            raise UserError(
                f"cannot resume the stream of {self.manifest.root} on {self.world} ranks x {self.slots} workers: "
                f"that needs the states of all {first['world']} ranks that saved it, {len(states)} given"
            )
        # before virtual consumers, every pass shuffled with the whole buffer
        residual = tuple(Work(e, Unit(s, p, n), start, *(buffer or [self.shuffle_buffer]))
                         for e, s, p, n, start, *buffer in first.get("residual", []))
        saved_virtual = first.get("virtual_consumers")  # None: saved before virtual consumers
        old_consumers = saved_virtual or first["world"] * first["workers"]
        grouped = saved_virtual is not None
        units = make_units(len(self.manifest.shards), old_consumers, grouped)
        buffer = pass_buffer(self.shuffle_buffer, old_consumers, units[0].parts) if grouped else self.shuffle_buffer
        old = Layout(old_consumers, units, self.seed, first.get("base_epoch", 0), residual, grouped, buffer)
        positions = {int(c): tuple(p) for s in states for c, p in s["positions"].items()}
        counts = {int(c): tuple(n) for s in states for c, n in s.get("counts", {}).items()}
        self.batches = int(first["batches"])  # the same on every rank
        if same_layout and len(states) == 1:
            self.carried = tuple(first.get("carried", (0, 0)))
        elif self.rank == 0:  # the old readers' counts, reported once
            self.carried = tuple(int(sum(s.get("carried", (0, 0))[i] for s in states)) for i in range(2))
        else:
            self.carried = (0, 0)
        if saved_virtual == self.virtual:
            mine = served(self.virtual, self.rank, self.world)
            self.layout = old
            self.positions = {c: p for c, p in positions.items() if c in mine}
            self.counts = {c: n for c, n in counts.items() if c in mine}
            return
        self.layout = self._redistribute(old, positions)
        self.positions, self.counts = {}, {}
        if self.rank == 0:
            self.carried = tuple(int(a + sum(n[i] for n in counts.values())) for i, a in enumerate(self.carried))
        self.notice = (
            f"the stream of {self.manifest.root} was saved with {old_consumers} "
            f"{'virtual consumers' if saved_virtual else 'consumers (before virtual consumers)'}, this run has "
            f"data.virtual_consumers={self.virtual}: what every saved consumer had left of its epochs is read first, "
            f"and the order of samples differs from the uninterrupted run from this step on"
        )

    def restore(self, own: dict | None, every_rank) -> None:
        """From a checkpoint: this rank's own saved state when the layout (ranks x workers) is
        unchanged, else every saved rank's (`every_rank()` gives them)."""
        same_layout = (own is not None and own["world"] == self.world and own["workers"] == self.slots
                       and own.get("virtual_consumers") == self.virtual)
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
                        left.append(Work(work.epoch, work.unit, start, work.buffer))
                    offset = 0
                phase, cursor, offset = phase + 1, 0, 0
        return Layout(self.virtual, make_units(len(self.manifest.shards), self.virtual), self.seed, last + 1, tuple(left), buffer=self.pass_buffer)

    def observe(self, batch: dict) -> dict:
        """Record that the training loop consumed `batch` (prefetched batches do not count)."""
        number = batch.pop("batch")
        if number != self.batches:
            raise RuntimeError(f"the stream of {self.manifest.root} delivered batch {number} where batch {self.batches} was due")
        for consumer, phase, cursor, offset, bad, read in batch.pop("positions").entries:
            self.positions[consumer], self.counts[consumer] = (phase, cursor, offset), (bad, read)
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
    def plan(self, consumer: int, epoch: int) -> list[Work]:
        return self.layout.plan(consumer, epoch)

    def __iter__(self) -> Iterator[dict]:
        return _carry_errors(self._pieces())

    def _pieces(self) -> Iterator[dict]:
        """This worker's piece of every batch from the stream's position on: the samples its virtual
        consumers give to the batch, in consumer order."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        consumers = served(self.virtual, self.rank, self.world, worker, self.pieces_per_batch)
        global_batch = self.batch_size * self.world
        counts = [self.counts.get(c, (0, 0)) for c in consumers]
        checker = SampleChecker(self.manifest, self.max_bad_fraction, sum(n[0] for n in counts), sum(n[1] for n in counts))
        passes = ShardPasses(self.manifest, self.seed)
        readers = [_Reader(self, c, passes, checker) for c in consumers]

        def holders(epoch: int, shard: int) -> list[tuple[Unit, int]]:
            if epoch < self.layout.base_epoch:  # residual work of an earlier layout: each part is read alone
                return []
            found = []
            for consumer, cursor, unit in self.layout.holders(epoch, shard):
                if consumer in consumers:
                    first = readers[consumer - consumers.start].about_to_read(epoch, cursor)
                    if first is not None:
                        found.append((unit, first))
            return found

        number = self.batches
        while True:
            pending: list[tuple[int, int, int, dict]] = []
            for reader in readers:
                reader.take(share(reader.consumer, number, self.virtual, global_batch), pending, holders)
            piece = collate(pending, self.views, self.seed) if pending else {"keys": []}
            piece.update(batch=number, positions=Positions(tuple((r.consumer, r.phase, r.cursor, r.offset, r.bad, r.read) for r in readers)))
            yield Piece(_small_as_numpy(piece)) if self.pieces_per_batch > 1 else piece
            number += 1

    def join(self, pieces: list["Piece"]) -> dict:
        """One batch from its pieces, in worker order (the training process calls it)."""
        pieces = [_small_as_numpy(piece.fields, back=True) for piece in pieces]
        if len({piece["batch"] for piece in pieces}) != 1:
            raise RuntimeError(f"the stream of {self.manifest.root} mixed the pieces of batches {[p['batch'] for p in pieces]}")
        full = [piece for piece in pieces if piece["keys"]]
        batch = {"batch": pieces[0]["batch"], "keys": [key for piece in full for key in piece["keys"]]}
        batch["positions"] = Positions(tuple(entry for piece in pieces for entry in piece["positions"].entries))
        for name in ("label", "truth", "epoch", "index", "decoded", "soft"):
            if name in full[0]:
                batch[name] = torch.cat([piece[name] for piece in full])
        if "inputs" in full[0]:
            batch["inputs"] = {name: torch.cat([piece["inputs"][name] for piece in full]) for name in full[0]["inputs"]}
        if "plans" in full[0]:
            batch["plans"] = {name: self.views[name].merge([piece["plans"][name] for piece in full]) for name in full[0]["plans"]}
        return batch


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
