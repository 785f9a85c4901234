"""Writing a dataset: a source's samples split class-balanced, encoded, and written as shards plus
one manifest per split (`dist-ssl shards write`)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dist_ssl.data.shards.codec import ENCODINGS, encode_input, prepare_image
from dist_ssl.data.shards.manifest import FORMAT, SPLITS
from dist_ssl.data.sources import Members, Source, plan_splits
from dist_ssl.errors import UserError
from dist_ssl.files import atomic_write_json

DEFAULT_MAXCOUNT = 10000
DEFAULT_MAXSIZE = 1 << 30


class _HashingFile:
    """A shard file being written: hashed as it is written, fsynced when closed."""

    def __init__(self, path: str):
        self.handle = open(path, "wb")
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.handle.write(data)

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def _tar_bytes(sample: dict) -> int:
    """What a sample adds to a tar: a 512-byte header per member plus its data padded to 512 bytes."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if not k.startswith("__"))


class SplitWriter:
    """Encoded samples -> the shards of one split (webdataset's ShardWriter) and their manifest entries.

    A shard is closed before a sample would take it past `maxsize` file bytes. ShardWriter's own
    maxsize counts payload bytes only, which for small images is a tenth of the file (tar headers and
    padding dominate), so the size is tracked here.
    """

    def __init__(self, split_dir: Path, split: str, num_classes: int, maxcount: int = DEFAULT_MAXCOUNT, maxsize: int = DEFAULT_MAXSIZE):
        split_dir.mkdir(parents=True, exist_ok=True)
        self.split_dir, self.split, self.num_classes = split_dir, split, num_classes
        self.maxcount, self.maxsize = maxcount, maxsize
        self.shards: list[dict] = []
        self.histogram = np.zeros(num_classes, np.int64)
        self.truth_histogram = np.zeros(num_classes, np.int64)
        self.shard_labels: list[int] = []
        self.count = 0
        self.shard_bytes = 0
        self.writer = None
        self.file: _HashingFile | None = None

    def _open(self, path: str) -> _HashingFile:
        self.file = _HashingFile(path)
        return self.file

    def _closed(self, path: str) -> None:
        self.file.close()
        self.shards.append({
            "url": Path(path).name,
            "num_samples": self.writer.count,
            "bytes": self.file.bytes,
            "sha256": self.file.digest.hexdigest(),
            "class_histogram": np.bincount(self.shard_labels, minlength=self.num_classes).tolist(),
        })
        self.shard_labels.clear()

    def write(self, key: str, ext: str, payload: bytes, label: int | None, truth: int | None) -> None:
        import webdataset as wds

        if self.writer is None:  # ShardWriter opens its first file at once: only create it for a non-empty split
            # An integer mtime keeps tar headers plain ustar: float mtimes make tarfile add a PAX header to
            # every member, which doubles parsing time when reading. It also makes shards byte-reproducible.
            self.writer = wds.ShardWriter(str(self.split_dir / f"{self.split}-%06d.tar"), maxcount=self.maxcount,
                                          maxsize=float("inf"), verbose=0, post=self._closed, opener=self._open, mtime=0)
        sample = {"__key__": key, ext: payload}
        known = None
        for name, value, histogram in (("cls", label, self.histogram), ("truth.cls", truth, self.truth_histogram)):
            if value is not None and value >= 0:
                if value >= self.num_classes:
                    raise UserError(f"sample {key} has label {value}, outside 0..{self.num_classes - 1}")
                sample[name] = str(value).encode()
                histogram[value] += 1
                known = value
        size = _tar_bytes(sample)
        if self.writer.count >= self.maxcount or (self.writer.count and self.shard_bytes + size + 1024 > self.maxsize):
            self.writer.next_stream()  # 1024: the two zero blocks that end a tar
            self.shard_bytes = 0
        self.shard_bytes += size
        self.writer.write(sample)  # may close the previous shard first: count this label only after
        if known is not None:
            self.shard_labels.append(known)
        self.count += 1

    def abort(self) -> None:
        """Close the open shard after a failure (its folder is about to be removed)."""
        if self.writer is not None and self.writer.tarstream is not None:
            self.writer.tarstream.close()
            self.file.handle.close()

    def close(self) -> dict:
        """The split's manifest fields (counts, histograms, shards)."""
        if self.writer is not None:
            self.writer.close()
        labeled = self.split != "unlabeled"
        return {
            "split": self.split,
            "num_samples": self.count,
            "class_histogram": self.histogram.tolist() if labeled else None,
            "truth_histogram": self.truth_histogram.tolist() if not labeled else None,
            "shards": self.shards,
        }


def write_split(
    items: Iterable[tuple[str, np.ndarray, int | None, int | None]],
    split_dir: Path,
    split: str,
    maxcount: int,
    header: dict,
    *,
    maxsize: int = DEFAULT_MAXSIZE,
) -> dict:
    """Write (key, array, label, truth) items as shards + manifest; arrays are encoded as `header['input']` says."""
    encoding = header["input"].get("encoding", "png")
    quality = header["input"].get("quality", 95)
    writer = SplitWriter(Path(split_dir), split, header["num_classes"], maxcount, maxsize)
    for key, array, label, truth in items:
        writer.write(key, *encode_input(array, header["input"]["kind"], encoding, quality), label, truth)
    manifest = dict(header, **writer.close())
    atomic_write_json(Path(split_dir) / "manifest.json", manifest)
    return manifest


@dataclass
class _EncodeJob:
    """Reads, prepares and encodes the samples of every split, in a worker process or in this one."""

    members: dict[str, Members]
    order: dict[str, np.ndarray]  # split -> permutation of its members: shards are i.i.d. slices
    kind: str
    encoding: str
    quality: int
    resize: int | None
    channels: int | None
    shape: tuple[int, ...]
    source: str

    def read(self, split: str, position: int) -> tuple[str, np.ndarray | str]:
        """(key, prepared array), or (key, why it cannot be read)."""
        pool, index = self.members[split][int(self.order[split][position])]
        try:
            array = pool.read(index)
            return pool.key(index), prepare_image(array, self.resize, self.channels) if self.kind == "image" else array
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for unreadable or truncated files
            return pool.key(index), f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    def encode(self, split: str, position: int) -> tuple:
        pool, index = self.members[split][int(self.order[split][position])]
        label = int(pool.labels[index]) if pool.labels is not None else None
        key, array = self.read(split, position)
        if isinstance(array, str):
            return ("skip", key, array)
        if array.shape != self.shape:
            hint = "pass --resize N to give every image one size" if self.kind == "image" else "vectors must have one length"
            raise UserError(f"sample {key} of '{self.source}' has shape {list(array.shape)}, the first has {list(self.shape)}: {hint}")
        ext, payload = encode_input(array, self.kind, self.encoding, self.quality)
        values = np.asarray(array, np.float64).reshape(-1, array.shape[-1] if self.kind == "image" else array.size)
        if self.kind == "image":
            values = values / 255.0
        return ("ok", key, ext, payload, label, values.sum(axis=0), (values * values).sum(axis=0), len(values))


def _first_readable(job: _EncodeJob, splits: list[str]) -> np.ndarray:
    """The first sample that reads sets the shape every other sample must have."""
    for split in splits:
        for position in range(len(job.members[split])):
            key, array = job.read(split, position)
            if not isinstance(array, str):
                return array
            if split != "unlabeled":
                raise UserError(f"cannot read sample {key} of '{job.source}' for the {split} split: {array}")
    raise UserError(f"source '{job.source}' has no readable samples")


_JOB: _EncodeJob | None = None  # what forked workers encode (set before the pool forks; pools do not pickle)


def _encode_in_worker(task: tuple[str, int]) -> tuple:
    return _JOB.encode(*task)


def _encoded(job: _EncodeJob, split: str, pool, window: int = 4096) -> Iterator[tuple]:
    """The split's encoded samples in order; with a process pool, two windows in flight bound the memory."""
    n = len(job.members[split])
    if pool is None:
        yield from (job.encode(split, i) for i in range(n))
        return
    pending: deque = deque()
    for start in range(0, n, window):
        tasks = [(split, i) for i in range(start, min(start + window, n))]
        pending.append(pool.imap(_encode_in_worker, tasks, chunksize=64))
        if len(pending) > 1:
            yield from pending.popleft()
    while pending:
        yield from pending.popleft()


def _check_write_options(out: Path, source: Source, maxcount: int, maxsize: int, workers: int, encoding: str, quality: int,
                         resize: int | None, channels: int | None) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output folder already exists and is not empty: {out} (choose another --out or remove it)")
    for name, value in (("--maxcount", maxcount), ("--maxsize", maxsize), ("--workers", workers)):
        if value < 1:
            raise UserError(f"{name} must be at least 1; got {value}")
    if encoding not in ENCODINGS:
        raise UserError(f"--encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be in 1..100; got {quality}")
    if resize is not None and resize < 1:
        raise UserError(f"--resize must be at least 1; got {resize}")
    if channels not in (None, 1, 3):
        raise UserError(f"--channels must be 1 or 3; got {channels}")
    if source.kind == "vector" and (encoding != "png" or resize or channels):
        raise UserError(f"source '{source.name}' holds vectors: --encoding, --resize and --channels apply to images only")


def _write_splits(job: _EncodeJob, splits: list[str], tmp: Path, num_classes: int, maxcount: int, maxsize: int,
                  workers: int) -> tuple[dict, dict, tuple]:
    """Encode (in `workers` processes) and write every split; returns each split's manifest fields, its
    skipped samples, and (sum, sum of squares, count) per channel over the training splits."""
    global _JOB
    process_pool = writer = None
    sums = squares = 0.0
    count = 0
    fields: dict[str, dict] = {}
    skipped: dict[str, list] = {}
    try:
        if workers > 1:
            import multiprocessing

            _JOB = job  # fork: workers inherit the pools (their readers are closures, which do not pickle)
            process_pool = multiprocessing.get_context("fork").Pool(workers)
        for split in splits:
            writer = SplitWriter(tmp / split, split, num_classes, maxcount, maxsize)
            skipped[split] = []
            for result in _encoded(job, split, process_pool):
                if result[0] == "skip":
                    _, key, reason = result
                    if split != "unlabeled":  # the labeled and test splits are the protocol: no silent holes
                        raise UserError(f"cannot read sample {key} of '{job.source}' for the {split} split: {reason}")
                    skipped[split].append({"key": key, "reason": reason})
                    continue
                _, key, ext, payload, label, s1, s2, n = result
                writer.write(key, ext, payload, None if split == "unlabeled" else label, label if split == "unlabeled" else None)
                if split != "test":
                    sums, squares, count = sums + s1, squares + s2, count + n
            fields[split] = writer.close()
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        _JOB = None
        if process_pool is not None:
            process_pool.terminate()
            process_pool.join()
    return fields, skipped, (sums, squares, count)


def write_dataset(
    source: Source,
    out: str | Path,
    labels_per_class: int | None,
    seed: int = 0,
    test_fraction: float = 0.3,
    maxcount: int = DEFAULT_MAXCOUNT,
    *,
    maxsize: int = DEFAULT_MAXSIZE,
    encoding: str = "png",
    quality: int = 95,
    resize: int | None = None,
    channels: int | None = None,
    workers: int = 1,
    source_path: str | None = None,
) -> dict[str, dict]:
    """Split `source` class-balanced and write its splits under `out`.

    Samples are read, prepared and encoded by `workers` processes and written in order by this one,
    so the bytes do not depend on `workers`. Mean and std are exact over the training splits, taken
    in the same pass. Everything is written into a hidden sibling folder that is renamed to `out`
    at the end, so an interrupted write never leaves a folder that looks like a finished dataset.
    """
    out = Path(out)
    _check_write_options(out, source, maxcount, maxsize, workers, encoding, quality, resize, channels)
    plan = plan_splits(source, labels_per_class, seed, test_fraction)
    if source.given_splits is not None:
        splits = [s for s in SPLITS if s in source.given_splits]
    else:
        splits = list(SPLITS) if source.train.labels is not None else ["unlabeled"]
    rng = np.random.default_rng(seed)
    members = {s: getattr(plan, s) for s in splits}
    # Shards are i.i.d. slices of a split; a re-sharded dataset keeps its order (it was shuffled when written).
    order = {s: np.arange(len(members[s])) if source.given_splits is not None else rng.permutation(len(members[s])) for s in splits}
    job = _EncodeJob(members, order, source.kind, encoding, quality, resize, channels if source.kind == "image" else None, (), source.name)
    first = _first_readable(job, splits)
    job.shape = tuple(first.shape)
    encoded_as = "npy" if source.kind == "vector" else encoding
    header = {
        "format": FORMAT,
        "source": source.name,
        "source_path": source_path,
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "input": {"kind": source.kind, "encoding": encoded_as, "shape": list(first.shape), "resize": resize},
        "protocol": plan.protocol,
    }
    if encoded_as == "jpg":
        header["input"]["quality"] = quality

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fields, skipped, (sums, squares, count) = _write_splits(job, splits, tmp, source.num_classes, maxcount, maxsize, workers)
        header["mean"] = header["std"] = None  # only a test split (re-sharding one): nothing to normalize with
        if count:
            mean = np.asarray(sums) / count
            std = np.sqrt(np.maximum(np.asarray(squares) / count - mean * mean, 0.0))
            header["mean"], header["std"] = mean.tolist(), np.where(std > 0, std, 1.0).tolist()
        manifests = {}
        for split in splits:
            manifests[split] = dict(header, **fields[split])
            if skipped[split]:
                manifests[split]["skipped"] = skipped[split]
            atomic_write_json(tmp / split / "manifest.json", manifests[split])
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifests
