"""Checking every shard of a dataset against its manifest (`dist-ssl shards verify`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_ssl.data.shards.codec import decode_sample
from dist_ssl.data.shards.manifest import SPLITS, DataError, Manifest, load_manifest
from dist_ssl.data.shards.tar import ShardReader
from dist_ssl.errors import UserError


@dataclass
class ShardReport:
    name: str  # split/file
    samples: int
    problems: list[str]


def _verify_shard(manifest: Manifest, index: int) -> ShardReport:
    """Everything about one shard: bytes, sha256, count, that every sample decodes to the manifest's
    shape, labels in range, unique keys, and its class histogram."""
    entry = manifest.data["shards"][index]
    shard = manifest.shards[index]
    url = manifest.url(shard)
    name = f"{manifest.root.name}/{shard.url}"
    reader = ShardReader(url, shard)
    problems: list[str] = []
    bad_samples: list[str] = []
    keys: set[str] = set()
    num_classes, labeled = manifest.num_classes, manifest.data.get("split") != "unlabeled"
    histogram = np.zeros(num_classes, np.int64)
    labels_in_range = True
    expected = manifest.input_shape
    try:
        for raw in reader:
            key = raw.get("__key__", "?")
            if key in keys:
                problems.append(f"sample key {key} occurs twice")
            keys.add(key)
            try:
                sample = decode_sample(raw, manifest.channels)
            except Exception as exc:
                bad_samples.append(f"{key} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
                continue
            if tuple(sample["input"].shape) != tuple(expected):
                bad_samples.append(f"{key} (shape {list(sample['input'].shape)}, the manifest says {list(expected)})")
            value = sample["label"] if labeled else sample["truth"]
            if labeled and value is None:
                problems.append(f"sample {key} has no label")
            elif value is not None:
                if not 0 <= value < num_classes:
                    problems.append(f"sample {key} has label {value}, outside 0..{num_classes - 1}")
                    labels_in_range = False
                else:
                    histogram[value] += 1
    except DataError as exc:
        problems.append(str(exc).removeprefix(f"shard {url} "))
    problems = reader.problems() + problems
    if bad_samples:
        problems.append(f"{len(bad_samples)} sample(s) do not decode: {', '.join(bad_samples[:3])}{' ...' if len(bad_samples) > 3 else ''}")
    if "class_histogram" in entry and num_classes and labels_in_range and reader.samples == shard.num_samples:
        if histogram.tolist() != entry["class_histogram"]:
            problems.append(f"class histogram {histogram.tolist()}, the manifest says {entry['class_histogram']}")
    return ShardReport(name, reader.samples, problems)


def _verify_task(task: tuple[str, int, bool]) -> ShardReport:
    return _verify_shard(load_manifest(task[0], task[2]), task[1])


def one_torch_thread() -> None:
    """For processes that decode one small image at a time: intra-op threads only add barrier waits
    (17x slower verification of 8x8 digits on a busy 2-core machine, measured); parallelism comes
    from processes."""
    import torch

    torch.set_num_threads(1)


def split_folders(folder: str | Path) -> list[Path]:
    """A dataset folder's split folders, or the folder itself when it is one split."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        return [folder]
    found = [folder / s for s in SPLITS if (folder / s / "manifest.json").is_file()]
    if not found:
        if not folder.is_dir():
            raise UserError(f"shard folder not found: {folder}")
        raise UserError(f"{folder} holds no manifest.json, nor splits with one ({', '.join(SPLITS)})")
    return found


def verify(folder: str | Path, workers: int = 1, allow_pipe: bool = False) -> list[ShardReport]:
    """Check every shard of a dataset (or of one split) against its manifest; one report per shard,
    plus one per split for problems of the manifest itself or tar files it does not list."""
    reports: list[ShardReport] = []
    tasks = []
    for split_dir in split_folders(folder):
        manifest = load_manifest(split_dir, allow_pipe)
        problems = []
        listed = {s.url for s in manifest.shards}
        counted = sum(s.num_samples for s in manifest.shards)
        if counted != manifest.num_samples:
            problems.append(f"the shards hold {counted} samples in all, the manifest says {manifest.num_samples}")
        problems += [f"{p.name} is not listed in the manifest" for p in sorted(split_dir.glob("*.tar")) if p.name not in listed]
        if problems:
            reports.append(ShardReport(f"{split_dir.name}/manifest.json", counted, problems))
        tasks += [(str(split_dir), i, allow_pipe) for i in range(len(manifest.shards))]
    if workers > 1 and len(tasks) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(workers, len(tasks)), initializer=one_torch_thread) as pool:
            reports += pool.map(_verify_task, tasks, chunksize=1)
    else:
        reports += [_verify_task(task) for task in tasks]
    return reports
