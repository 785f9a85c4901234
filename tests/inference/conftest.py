"""Pools for the sharded jobs: real digits, re-packed into shards of uneven sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dist_ssl.data.shards.manifest import FORMAT, load_manifest, sha256_file
from dist_ssl.data.shards.tar import raw_samples

UNEVEN = [3, 400, 1, 250, 5, 348, 200]  # 7 shards, 1,207 samples: the digits unlabeled split


def repack(split_dir: Path, out: Path, sizes: list[int]) -> Path:
    """The samples of a split, bytes unchanged and in order, as shards of the given sizes + a manifest."""
    import webdataset as wds

    manifest = load_manifest(split_dir)
    samples = [raw for shard in manifest.shards for raw in raw_samples(manifest.url(shard))]
    assert sum(sizes) == len(samples), (sum(sizes), len(samples))
    out.mkdir(parents=True)
    shards, start = [], 0
    for index, size in enumerate(sizes):
        path = out / f"pool-{index:06d}.tar"
        histogram = np.zeros(manifest.num_classes, np.int64)
        with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
            for raw in samples[start : start + size]:
                writer.write({k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"})
                histogram[int(raw["truth.cls"])] += 1
        shards.append({"url": path.name, "num_samples": size, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                       "class_histogram": histogram.tolist()})
        start += size
    data = dict(manifest.data, shards=shards, num_samples=len(samples))
    assert data["format"] == FORMAT
    (out / "manifest.json").write_text(json.dumps(data, indent=1))
    return out


@pytest.fixture(scope="session")
def digits32(tmp_path_factory) -> Path:
    """scikit-learn's digits scaled up 4x to 32x32 (nearest neighbour), 5 labels per class: real
    images whose inference takes long enough to kill a run in the middle of it."""
    from sklearn.datasets import load_digits

    from dist_ssl.data.shards.writer import write_dataset
    from dist_ssl.data.sources import Pool, Source

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = images.repeat(4, axis=1).repeat(4, axis=2)[..., None]
    source = Source("digits32", "image", [str(c) for c in range(10)], Pool.from_arrays("train", images, bunch.target))
    out = tmp_path_factory.mktemp("digits32") / "dataset"
    write_dataset(source, out, labels_per_class=5, seed=0, maxcount=100)
    return out


@pytest.fixture(scope="session")
def teacher32(digits32, tmp_path_factory) -> Path:
    """A committed checkpoint of a few supervised steps on digits32 (a run folder)."""
    from dist_ssl.engine.loop import train
    from tests.conftest import tiny_config

    run = tmp_path_factory.mktemp("teacher32") / "run"
    train(tiny_config(digits32, run, "supervised", "data.workers=0"))
    return run


@pytest.fixture(scope="session")
def pool7(digits32, tmp_path_factory) -> Path:
    """The digits32 unlabeled split as 7 shards of uneven sizes (3 to 400 samples)."""
    return repack(digits32 / "unlabeled", tmp_path_factory.mktemp("pool7") / "unlabeled", UNEVEN)


@pytest.fixture(scope="session")
def teacher8(digits_shards, tmp_path_factory) -> Path:
    """A committed checkpoint of a few supervised steps on the 8x8 digits (a run folder)."""
    from dist_ssl.engine.loop import train
    from tests.conftest import tiny_config

    run = tmp_path_factory.mktemp("teacher8") / "run"
    train(tiny_config(digits_shards, run, "supervised", "data.workers=0"))
    return run
