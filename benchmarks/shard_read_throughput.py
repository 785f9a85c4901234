"""Reading the same 20k Fashion-MNIST images from dist-ssl shards vs a torchvision ImageFolder.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python benchmarks/shard_read_throughput.py

Both sides hold byte-identical PNG files (the shard members are written out as one file per image
under <class>/ folders) and produce the same batches: 256 normalized 1x28x28 float tensors with
labels, shuffled. Readers:

* `TrainStream`  - dist-ssl's training stream (shuffle buffer, positions, sha256 checked as read);
* `EvalStream`   - dist-ssl's exactly-once stream (shard order, sha256 checked as read);
* `ImageFolder`  - torchvision's ImageFolder (PIL decode, convert("L")) + DataLoader(shuffle=True).

For each worker count, the three readers run in turn, `--repeats` times, after one untimed pass that
puts every file in the page cache. Reported: time to first batch (from creating the loader) and
samples/s over the rest of one pass (median of the repeats), and the ratio to ImageFolder at the same
worker count, measured in this run.

`--epochs K` times K passes over the data with one loader (ImageFolder: K epochs of its DataLoader),
as a training stream runs: one pass alone also charges a reader with what it has read ahead and not
yet handed out when the pass ends (the training stream's shuffle buffers, one per open shard).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_ssl.config import AugmentConfig
from dist_ssl.data.loading import loader
from dist_ssl.data.shards.manifest import load_manifest
from dist_ssl.data.shards.tar import raw_samples
from dist_ssl.data.shards.writer import write_split
from dist_ssl.data.sources import load_source
from dist_ssl.data.streams import EvalStream, TrainStream
from dist_ssl.data.transforms import build_views

BATCH = 256
READERS = ["ImageFolder", "TrainStream", "EvalStream"]


def build(work: Path, count: int, maxcount: int) -> tuple[Path, Path]:
    """Shards (one split) and an ImageFolder of the same PNG bytes."""
    source = load_source("fashion-mnist")
    images = np.stack([source.train.read(i) for i in range(count)])
    values = images.astype(np.float64) / 255
    header = {
        "format": "dist-ssl-shards/1", "source": "fashion-mnist", "num_classes": 10, "class_names": source.class_names,
        "input": {"kind": "image", "encoding": "png", "shape": [28, 28, 1]}, "protocol": {},
        "mean": [float(values.mean())], "std": [float(values.std())],
    }
    items = ((f"train-{i:08d}", images[i], int(source.train.labels[i]), None) for i in range(count))
    write_split(items, work / "shards", "labeled", maxcount, header)
    folder = work / "imagefolder"
    manifest = load_manifest(work / "shards")
    for shard in manifest.shards:
        for raw in raw_samples(manifest.url(shard)):
            target = folder / f"{int(raw['cls']):02d}" / f"{raw['__key__']}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(raw["png"])
    return work / "shards", folder


def grey(path: str):
    from PIL import Image

    with open(path, "rb") as handle:
        return Image.open(handle).convert("L")


def image_folder_batches(folder: Path, workers: int, mean: float, std: float):
    from torchvision import datasets
    from torchvision.transforms import v2

    transform = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([mean], [std])])
    dataset = datasets.ImageFolder(str(folder), transform=transform, loader=grey)
    data = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    return (batch for _ in iter(int, 1) for batch in data)  # epoch after epoch, as a training stream is


def shard_batches(split: Path, kind: str, workers: int):
    manifest = load_manifest(split)
    views = build_views("image", manifest.input_shape, manifest.data["mean"], manifest.data["std"], AugmentConfig())
    if kind == "TrainStream":  # infinite
        stream = TrainStream(manifest, BATCH, {"plain": views["plain"]}, 0, 1, workers, seed=0, shuffle_buffer=2000)
        return iter(loader(stream, workers))
    stream = EvalStream(manifest, BATCH, views["plain"], 0, 1)  # one pass, read again as evaluation does
    return (batch for _ in iter(int, 1) for batch in loader(stream, min(workers, len(manifest.shards))))


def one_pass(make, count: int) -> tuple[float, float]:
    """(seconds to the first batch, samples/s over the rest of `count` samples)."""
    start = time.perf_counter()
    batches = make()
    first = next(batches)
    first_at = time.perf_counter()
    seen = len(first["label"] if isinstance(first, dict) else first[1])
    rest = 0
    while seen < count:
        batch = next(batches)
        n = len(batch["label"] if isinstance(batch, dict) else batch[1])
        seen += n
        rest += n
    elapsed = time.perf_counter() - first_at
    del batches
    return first_at - start, rest / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="passes over the data timed with one loader")
    parser.add_argument("--readers", nargs="+", default=READERS, choices=READERS, help="which to time (x ImageFolder needs ImageFolder)")
    parser.add_argument("--work", help="folder for the data (default: a temporary folder, removed afterwards)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="dist-ssl-bench-"))
    try:
        t = time.perf_counter()
        shards, folder = build(work, args.count, args.maxcount)
        manifest = load_manifest(shards)
        mean, std = manifest.data["mean"][0], manifest.data["std"][0]
        print(f"{args.count} Fashion-MNIST images: {len(manifest.shards)} shards of {args.maxcount}, and an ImageFolder of "
              f"{args.count} PNG files (same bytes), built in {time.perf_counter() - t:.0f} s under {work}")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; "
              f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')} "
              f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}")
        shard_bytes = b"".join((shards / s.url).read_bytes() for s in manifest.shards)  # also warms the page cache
        t = time.perf_counter()
        import hashlib

        hashlib.sha256(shard_bytes).hexdigest()
        hash_seconds = time.perf_counter() - t
        for path in folder.rglob("*.png"):
            path.read_bytes()
        readers = {
            "ImageFolder": lambda w: image_folder_batches(folder, w, mean, std),
            "TrainStream": lambda w: shard_batches(shards, "TrainStream", w),
            "EvalStream": lambda w: shard_batches(shards, "EvalStream", w),
        }
        readers = {name: make for name, make in readers.items() if name in args.readers}
        for make in readers.values():  # warm-up: imports, first fork
            one_pass(lambda: make(1), args.count)
        print(f"sha256 of all {len(shard_bytes) / 1e6:.1f} MB of shards: {hash_seconds * 1000:.0f} ms in one thread")
        print()
        print(f"{'reader':<12} {'workers':>7} {'first batch s':>14} {'samples/s':>10} {'x ImageFolder':>14}")
        for workers in args.workers:
            results = {name: [] for name in readers}
            for _ in range(args.repeats):
                for name, make in readers.items():
                    results[name].append(one_pass(lambda: make(workers), args.count * args.epochs))
            base = statistics.median(r[1] for r in results["ImageFolder"]) if "ImageFolder" in results else math.nan
            for name, runs in results.items():
                first = statistics.median(r[0] for r in runs)
                rate = statistics.median(r[1] for r in runs)
                each = " / ".join(f"{r[1]:.0f}" for r in runs)
                print(f"{name:<12} {workers:>7} {first:>14.3f} {rate:>10.0f} {rate / base:>14.2f}   ({each})", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
