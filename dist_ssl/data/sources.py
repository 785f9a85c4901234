"""Where samples come from before they become shards.

A `Source` has a labeled training pool, an optional official test pool and optionally an extra
unlabeled pool. Pools are index-addressable so that a huge pool never has to sit in memory; only
the labels are loaded up front (the split protocol needs them).
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from dist_ssl.errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Pool:
    """Samples of one origin ('train', 'test', 'unlabeled'...), read one at a time by index."""

    origin: str
    size: int
    read: Callable[[int], np.ndarray]  # i -> HWC uint8 image, or a [D] float32 vector
    labels: np.ndarray | None  # int64 [size]; None when the pool carries no labels at all

    @classmethod
    def from_arrays(cls, origin: str, data: np.ndarray, labels: np.ndarray | None) -> "Pool":
        return cls(origin, len(data), data.__getitem__, None if labels is None else np.asarray(labels, np.int64))


@dataclass
class Source:
    name: str
    kind: Literal["image", "vector"]
    class_names: list[str]
    train: Pool
    test: Pool | None = None  # None: a stratified test split is held out of `train`
    extra_unlabeled: Pool | None = None  # e.g. STL-10's 100k unlabeled images

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def digits(path: str | None = None, seed: int = 0) -> Source:
    """scikit-learn's 1,797 8x8 digits (values 0..16, stored as 0..255 grey images)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    return Source("digits", "image", [str(c) for c in range(10)], Pool.from_arrays("train", images, bunch.target))


def moons(path: str | None = None, seed: int = 0, n_samples: int = 2000, noise: float = 0.1) -> Source:
    """The two-moons toy problem (seed 002): 2-D points, 2 classes, generated from `seed`."""
    from sklearn.datasets import make_moons

    points, labels = make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    return Source("moons", "vector", ["upper", "lower"], Pool.from_arrays("train", points.astype(np.float32), labels))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise UserError(f"Fashion-MNIST file {stem}(.gz) not found in {root} (apt-get install dataset-fashion-mnist, or pass --path)")


def fashion_mnist(path: str | None = None, seed: int = 0) -> Source:
    """Fashion-MNIST from its four original idx files (Debian's `dataset-fashion-mnist` by default)."""
    root = Path(path) if path else FASHION_MNIST_DIR
    if not root.is_dir():
        raise UserError(f"Fashion-MNIST folder not found: {root} (apt-get install dataset-fashion-mnist, or pass --path)")
    pools = {}
    for origin, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))[..., None]
        labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(images) != len(labels):
            raise UserError(f"Fashion-MNIST {origin} images ({len(images)}) and labels ({len(labels)}) differ in count")
        pools[origin] = Pool.from_arrays(origin, images, labels)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return Source("fashion-mnist", "image", names, pools["train"], pools["test"])


SOURCES: dict[str, Callable[..., Source]] = {
    "digits": digits,
    "moons": moons,
    "fashion-mnist": fashion_mnist,
}


def load_source(name: str, path: str | None = None, seed: int = 0) -> Source:
    if name not in SOURCES:
        import difflib

        near = difflib.get_close_matches(name, list(SOURCES), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"unknown source '{name}'{hint}; choose from: {', '.join(SOURCES)}")
    return SOURCES[name](path=path, seed=seed)


@dataclass
class SplitPlan:
    """Which (pool, index) pairs go to each split. Unlabeled samples keep their truth for monitoring."""

    labeled: list[tuple[Pool, int]]
    unlabeled: list[tuple[Pool, int]]
    test: list[tuple[Pool, int]]


def plan_splits(source: Source, labels_per_class: int, seed: int, test_fraction: float = 0.3) -> SplitPlan:
    """Class-balanced labeled split: `labels_per_class` of every class, the rest of the pool unlabeled.

    Sources without an official test split hold out a stratified `test_fraction` first, so the
    test split never overlaps the training pools.
    """
    if labels_per_class < 1:
        raise UserError(f"--labels-per-class must be at least 1; got {labels_per_class}")
    labels = source.train.labels
    if labels is None:
        raise UserError(f"source '{source.name}' has no labeled training pool")
    rng = np.random.default_rng(seed)
    train_idx = np.arange(source.train.size)
    test: list[tuple[Pool, int]]
    if source.test is None:
        if not 0 < test_fraction < 1:
            raise UserError(f"--test-fraction must be in (0, 1); got {test_fraction}")
        from sklearn.model_selection import train_test_split

        train_idx, test_idx = train_test_split(train_idx, test_size=test_fraction, stratify=labels, random_state=seed)
        test = [(source.train, int(i)) for i in sorted(test_idx)]
    else:
        test = [(source.test, i) for i in range(source.test.size)]
    labeled_idx = []
    for cls in range(source.num_classes):
        members = train_idx[labels[train_idx] == cls]
        if len(members) < labels_per_class:
            raise UserError(
                f"--labels-per-class {labels_per_class} is larger than class '{source.class_names[cls]}' has "
                f"({len(members)} in the training pool of '{source.name}')"
            )
        labeled_idx.extend(rng.choice(members, size=labels_per_class, replace=False).tolist())
    chosen = set(labeled_idx)
    unlabeled = [(source.train, int(i)) for i in sorted(train_idx) if int(i) not in chosen]
    if source.extra_unlabeled is not None:
        unlabeled += [(source.extra_unlabeled, i) for i in range(source.extra_unlabeled.size)]
    return SplitPlan([(source.train, int(i)) for i in sorted(labeled_idx)], unlabeled, test)
