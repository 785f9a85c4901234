"""Where samples come from before they become shards.

A `Source` has a labeled training pool, an optional official test pool and optionally an extra
unlabeled pool; a source without labels (a folder of images) has only an unlabeled pool, and a
dist-ssl dataset being re-sharded comes already split. Pools are index-addressable and read one
sample at a time, so a huge pool (STL-10's 100k unlabeled images, an ImageFolder of millions)
never sits in memory; only the labels are loaded up front (the split protocol needs them).

Downloads go through torchvision (`--download`: its classes fetch and md5-check the archives). The
files are then read here, in the very layout torchvision leaves on disk: torchvision's classes read
whole files into memory (2.7 GB for STL-10's unlabeled split) and re-hash every file on each
construction, and we need lazy pools.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np

from dist_ssl.data.shards.codec import INPUT_EXTENSIONS, decode_member, read_image_file
from dist_ssl.data.shards.manifest import SPLITS, load_manifest
from dist_ssl.errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# What PIL and torchvision's ImageFolder read; the shard writer re-encodes every image anyway.
IMAGE_FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Pool:
    """Samples of one origin ('train', 'test', 'unlabeled'...), read one at a time by index."""

    origin: str
    size: int
    read: Callable[[int], np.ndarray]  # i -> HWC uint8 image (1 or 3 channels), or a [D] float32 vector
    labels: np.ndarray | None  # int64 [size], -1 where unknown; None when the pool carries no labels at all
    keys: Callable[[int], str] | None = None  # sample keys to keep (re-sharding); default '<origin>-<index>'

    @classmethod
    def from_arrays(cls, origin: str, data: np.ndarray, labels: np.ndarray | None) -> "Pool":
        return cls(origin, len(data), data.__getitem__, None if labels is None else np.asarray(labels, np.int64))

    def key(self, index: int) -> str:
        return self.keys(index) if self.keys is not None else f"{self.origin}-{index:08d}"


@dataclass
class Source:
    name: str
    kind: Literal["image", "vector"]
    class_names: list[str]  # empty for a source without classes (unlabeled images)
    train: Pool
    test: Pool | None = None  # None: a stratified test split is held out of `train`
    extra_unlabeled: Pool | None = None  # e.g. STL-10's 100k unlabeled images
    # A dist-ssl dataset being re-sharded: its splits are kept as they are (pool per split).
    given_splits: dict[str, Pool] | None = None
    protocol: dict = field(default_factory=dict)  # how `given_splits` were made, copied into the new manifests

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class SourceOptions:
    path: str | None = None  # where the source's files are (or go, with `download`)
    seed: int = 0  # sources that generate data (moons) use it
    download: bool = False  # let torchvision fetch the files into `path` when they are missing


def _root(options: SourceOptions, name: str, holds: str) -> Path:
    if not options.path:
        raise UserError(f"source '{name}' needs --path: the folder that holds {holds} (or where --download puts it)")
    return Path(options.path).expanduser()


def _download(name: str, fetch: Callable[[], object]) -> None:
    try:
        fetch()
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError... with long texts
        raise UserError(f"downloading {name} through torchvision failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


# ----------------------------------------------------------------------------------------------
# generated and embedded


def digits(options: SourceOptions) -> Source:
    """scikit-learn's 1,797 8x8 digits (values 0..16, stored as 0..255 grey images)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    return Source("digits", "image", [str(c) for c in range(10)], Pool.from_arrays("train", images, bunch.target))


def moons(options: SourceOptions, n_samples: int = 2000, noise: float = 0.1) -> Source:
    """The two-moons toy problem (seed 002): 2-D points, 2 classes, generated from the seed."""
    from sklearn.datasets import make_moons

    points, labels = make_moons(n_samples=n_samples, noise=noise, random_state=options.seed)
    return Source("moons", "vector", ["upper", "lower"], Pool.from_arrays("train", points.astype(np.float32), labels))


# ----------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: idx files


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


def _idx_folder(root: Path, torchvision_name: str) -> Path | None:
    """The folder holding the idx files: `root` itself (Debian's packages) or torchvision's `root/<Name>/raw`."""
    for folder in (root, root / torchvision_name / "raw", root / "raw"):
        if any((folder / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
            return folder
    return None


def _idx_source(options: SourceOptions, name: str, torchvision_name: str, class_names: list[str], default: Path | None) -> Source:
    if options.path is None and default is not None and not options.download:
        root = default
        if not root.is_dir():
            raise UserError(f"{name} folder not found: {root} (apt-get install dataset-{name}, or pass --path)")
    else:
        root = _root(options, name, f"the idx files (or {torchvision_name}/raw/)")
    folder = _idx_folder(root, torchvision_name)
    if folder is None and options.download:
        import torchvision.datasets

        # One construction fetches all four files.
        _download(name, lambda: getattr(torchvision.datasets, torchvision_name)(str(root), train=True, download=True))
        folder = _idx_folder(root, torchvision_name)
    if folder is None:
        raise UserError(f"{name} idx files not found in {root} or {root / torchvision_name / 'raw'} (pass --download to fetch them through torchvision)")
    pools = {}
    for origin, prefix in (("train", "train"), ("test", "t10k")):
        paths = {}
        for part in ("images-idx3", "labels-idx1"):
            stem = f"{prefix}-{part}-ubyte"
            found = [folder / (stem + ext) for ext in (".gz", "") if (folder / (stem + ext)).is_file()]
            if not found:
                raise UserError(f"{name} file {stem}(.gz) not found in {folder}")
            paths[part] = found[0]
        images = _read_idx(paths["images-idx3"])[..., None]
        labels = _read_idx(paths["labels-idx1"]).astype(np.int64)
        if len(images) != len(labels):
            raise UserError(f"{name} {origin} images ({len(images)}) and labels ({len(labels)}) differ in count")
        pools[origin] = Pool.from_arrays(origin, images, labels)
    return Source(name, "image", class_names, pools["train"], pools["test"])


def fashion_mnist(options: SourceOptions) -> Source:
    """Fashion-MNIST from its four original idx files (Debian's `dataset-fashion-mnist` by default)."""
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return _idx_source(options, "fashion-mnist", "FashionMNIST", names, FASHION_MNIST_DIR)


def mnist(options: SourceOptions) -> Source:
    """MNIST from its four original idx files (torchvision's `MNIST/raw/` layout, or the files themselves)."""
    return _idx_source(options, "mnist", "MNIST", [str(c) for c in range(10)], None)


# ----------------------------------------------------------------------------------------------
# CIFAR, SVHN, STL-10: the formats torchvision downloads


def _cifar(options: SourceOptions, name: str, folder_name: str, torchvision_name: str, files: dict, label_key: str, meta: tuple) -> Source:
    import pickle

    root = _root(options, name, f"{folder_name}/")
    folder = root / folder_name
    if not folder.is_dir() and options.download:
        import torchvision.datasets

        _download(name, lambda: getattr(torchvision.datasets, torchvision_name)(str(root), train=False, download=True))
    if not folder.is_dir():
        raise UserError(f"{name} not found: no {folder_name}/ in {root} (pass --download to fetch it through torchvision)")

    def load(filename: str) -> dict:
        path = folder / filename
        if not path.is_file():
            raise UserError(f"{name} file {path} is missing")
        # CIFAR's own distribution format (python pickles, fetched and md5-checked by torchvision);
        # shards never contain pickles.
        with open(path, "rb") as handle:
            try:
                return pickle.load(handle, encoding="latin1")
            except Exception as exc:
                raise UserError(f"{name} file {path} is not readable: {exc}") from None

    pools = {}
    for origin, batch_files in files.items():
        batches = [load(f) for f in batch_files]
        data = np.concatenate([np.asarray(b["data"], np.uint8) for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.concatenate([np.asarray(b[label_key], np.int64) for b in batches])
        pools[origin] = Pool.from_arrays(origin, np.ascontiguousarray(data), labels)
    meta_file, names_key = meta
    return Source(name, "image", list(load(meta_file)[names_key]), pools["train"], pools["test"])


def cifar10(options: SourceOptions) -> Source:
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _cifar(options, "cifar10", "cifar-10-batches-py", "CIFAR10", files, "labels", ("batches.meta", "label_names"))


def cifar100(options: SourceOptions) -> Source:
    files = {"train": ["train"], "test": ["test"]}
    return _cifar(options, "cifar100", "cifar-100-python", "CIFAR100", files, "fine_labels", ("meta", "fine_label_names"))


def svhn(options: SourceOptions) -> Source:
    """SVHN's cropped digits (train 73,257, test 26,032); label 10 means the digit 0, as in torchvision."""
    from scipy.io import loadmat

    root = _root(options, "svhn", "train_32x32.mat and test_32x32.mat")
    pools = {}
    for origin in ("train", "test"):
        path = root / f"{origin}_32x32.mat"
        if not path.is_file() and options.download:
            import torchvision.datasets

            _download("svhn", lambda: torchvision.datasets.SVHN(str(root), split=origin, download=True))
        if not path.is_file():
            raise UserError(f"svhn file {path} not found (pass --download to fetch it through torchvision)")
        try:
            mat = loadmat(str(path))
        except Exception as exc:
            raise UserError(f"svhn file {path} is not readable: {exc}") from None
        images = np.ascontiguousarray(np.transpose(mat["X"], (3, 0, 1, 2)))  # HWCN -> NHWC
        labels = mat["y"].astype(np.int64).reshape(-1)
        labels[labels == 10] = 0
        pools[origin] = Pool.from_arrays(origin, images, labels)
    return Source("svhn", "image", [str(c) for c in range(10)], pools["train"], pools["test"])


def stl10(options: SourceOptions) -> Source:
    """STL-10: 5,000 labeled train, 8,000 test and 100,000 unlabeled 96x96 images, memory-mapped."""
    root = _root(options, "stl10", "stl10_binary/")
    folder = root / "stl10_binary"
    if not folder.is_dir() and options.download:
        import torchvision.datasets

        _download("stl10", lambda: torchvision.datasets.STL10(str(root), split="test", download=True))
    if not folder.is_dir():
        raise UserError(f"stl10 not found: no stl10_binary/ in {root} (pass --download to fetch it through torchvision)")
    image_bytes = 3 * 96 * 96

    def pool(origin: str, labeled: bool) -> Pool:
        path = folder / f"{origin}_X.bin"
        if not path.is_file():
            raise UserError(f"stl10 file {path} is missing")
        if path.stat().st_size % image_bytes:
            raise UserError(f"stl10 file {path} is truncated ({path.stat().st_size} bytes is not a whole number of 96x96x3 images)")
        images = np.memmap(path, np.uint8, mode="r").reshape(-1, 3, 96, 96)
        labels = None
        if labeled:
            labels = np.fromfile(folder / f"{origin}_y.bin", np.uint8).astype(np.int64) - 1  # stored 1..10
            if len(labels) != len(images):
                raise UserError(f"stl10 {origin} images ({len(images)}) and labels ({len(labels)}) differ in count")

        def read(index: int) -> np.ndarray:
            return np.ascontiguousarray(images[index].transpose(2, 1, 0))  # stored column-major: C, W, H

        return Pool(origin, len(images), read, labels)

    names_file = folder / "class_names.txt"
    names = names_file.read_text().split() if names_file.is_file() else [str(c) for c in range(10)]
    return Source("stl10", "image", names, pool("train", True), pool("test", True), pool("unlabeled", False))


# ----------------------------------------------------------------------------------------------
# image files: an ImageFolder tree, or a folder of unlabeled images


def _file_pool(origin: str, paths: list[str], labels: np.ndarray | None, root: Path) -> Pool:
    # A sample's key is its file's path below the root, made a valid WebDataset key (no dots: they
    # start the extension).
    keys = [os.path.relpath(path, root).rsplit(".", 1)[0].replace(".", "_").replace(os.sep, "/") for path in paths]
    if len(set(keys)) < len(keys):
        first = {}
        for path, key in zip(paths, keys):
            if key in first:
                raise UserError(f"{first[key]} and {path} would both be sample {key} (rename one)")
            first[key] = path
    return Pool(origin, len(paths), lambda index: read_image_file(paths[index]), labels, keys.__getitem__)


def imagefolder(options: SourceOptions) -> Source:
    """Any `root/<class>/**/<image>` tree, with torchvision's ImageFolder class order (sorted names)."""
    from torchvision.datasets.folder import find_classes, make_dataset

    root = _root(options, "imagefolder", "one sub-folder of images per class")
    if not root.is_dir():
        raise UserError(f"imagefolder: folder not found: {root}")
    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMAGE_FILE_EXTENSIONS, allow_empty=True)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"imagefolder: {root}: {exc}") from None
    if not samples:
        raise UserError(f"imagefolder: no images under {root} (expected {root}/<class>/<image>{IMAGE_FILE_EXTENSIONS[0]})")
    paths = [path for path, _ in samples]
    labels = np.fromiter((label for _, label in samples), np.int64, len(samples))
    return Source("imagefolder", "image", classes, _file_pool("train", paths, labels, root))


def images(options: SourceOptions) -> Source:
    """Every image file below a folder, in any sub-folders, without classes: an unlabeled pool only."""
    root = _root(options, "images", "the images (any depth)")
    if not root.is_dir():
        raise UserError(f"images: folder not found: {root}")
    paths = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(root, followlinks=True)
        for name in names
        if name.lower().endswith(IMAGE_FILE_EXTENSIONS)
    )
    if not paths:
        raise UserError(f"images: no image files ({', '.join(IMAGE_FILE_EXTENSIONS)}) under {root}")
    return Source("images", "image", [], _file_pool("unlabeled", paths, None, root))


# ----------------------------------------------------------------------------------------------
# existing tar shards: a dist-ssl dataset (re-shard, splits kept) or any folder of WebDataset tars


def _index_tars(tar_paths: list[Path], label_member: str) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """One pass over the tar headers: keys, (shard, offset, size) of each sample's input member, its
    extension, and labels (-1 where none), without reading any image."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    keys: list[str] = []
    where: list[tuple[int, int, int]] = []
    exts: list[str] = []
    labels: list[int] = []
    seen: dict[str, int] = {}
    for shard, path in enumerate(tar_paths):
        try:
            with tarfile.open(path, "r:") as tar:
                current: dict = {}
                for info in tar:
                    if not info.isreg():
                        continue
                    key, ext = base_plus_ext(info.name)
                    if key is None:
                        continue
                    if current.get("key") != key:
                        current = {"key": key, "label": -1}
                        if key in seen:
                            raise UserError(f"sample key {key} occurs in {tar_paths[seen[key]]} and {path}: keys must be unique")
                        seen[key] = shard
                        keys.append(key)
                        where.append((-1, 0, 0))
                        exts.append("")
                        labels.append(-1)
                    if ext in INPUT_EXTENSIONS and not exts[-1]:
                        where[-1], exts[-1] = (shard, info.offset_data, info.size), ext
                    elif ext == label_member:
                        labels[-1] = int(tar.extractfile(info).read())
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise UserError(f"cannot index {path}: {exc}") from None
    missing = [k for k, e in zip(keys, exts) if not e]
    if missing:
        raise UserError(f"sample {missing[0]} has no image or .npy member ({len(missing)} such samples)")
    return keys, np.array(where, np.int64).reshape(-1, 3), exts, np.array(labels, np.int64)


def _tar_pool(origin: str, tar_paths: list[Path], label_member: str) -> Pool:
    keys, where, exts, labels = _index_tars(tar_paths, label_member)

    def read(index: int) -> np.ndarray:
        shard, offset, size = where[index]
        with open(tar_paths[shard], "rb") as handle:
            handle.seek(int(offset))
            data = handle.read(int(size))
        return decode_member(data, exts[index])

    return Pool(origin, len(keys), read, labels if (labels >= 0).any() else None, keys.__getitem__)


def _manifest_of(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def tars(options: SourceOptions) -> Source:
    """Existing tar shards.

    A dist-ssl dataset folder (labeled/ unlabeled/ test/ with manifests) is re-sharded with its splits
    and keys kept. Any other folder of `.tar` files (a dist-ssl split, or WebDataset shards from elsewhere:
    `KEY.png|jpg|npy` + optional `KEY.cls`) is one pool: labeled when its samples carry `.cls`, else unlabeled.
    """
    root = _root(options, "tars", "the .tar shards (or a dist-ssl dataset folder)")
    if not root.is_dir():
        raise UserError(f"tars: folder not found: {root}")
    split_dirs = {s: root / s for s in SPLITS if (root / s / "manifest.json").is_file()}
    if split_dirs:
        manifests = {s: load_manifest(d) for s, d in split_dirs.items()}
        first = next(iter(manifests.values()))
        pools = {
            split: _tar_pool(split, [Path(m.url(s)) for s in m.shards], "truth.cls" if split == "unlabeled" else "cls")
            for split, m in manifests.items()
        }
        protocol = dict(first.data.get("protocol") or {}, resharded_from=str(root))
        return Source(first.data.get("source", "tars"), first.kind, list(first.data.get("class_names") or []),
                      next(iter(pools.values())), given_splits=pools, protocol=protocol)
    tar_paths = sorted(root.glob("*.tar"))
    if not tar_paths:
        raise UserError(f"tars: no .tar files in {root} and no dist-ssl splits (labeled/, unlabeled/, test/)")
    pool = _tar_pool("train", tar_paths, "cls")
    manifest = _manifest_of(root)
    if pool.labels is not None and (pool.labels < 0).any():
        raise UserError(f"tars: {int((pool.labels < 0).sum())} of {pool.size} samples in {root} have no .cls label (all or none must have one)")
    kind = manifest["input"]["kind"] if manifest else ("vector" if pool.read(0).ndim == 1 else "image")
    if manifest and manifest.get("class_names"):
        class_names = list(manifest["class_names"])
    else:
        class_names = [str(c) for c in range(int(pool.labels.max()) + 1)] if pool.labels is not None else []
    if pool.labels is None:
        pool.origin = "unlabeled"
    return Source("tars", kind, class_names, pool)


SOURCES: dict[str, Callable[[SourceOptions], Source]] = {
    "digits": digits,
    "moons": moons,
    "mnist": mnist,
    "fashion-mnist": fashion_mnist,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "svhn": svhn,
    "stl10": stl10,
    "imagefolder": imagefolder,
    "images": images,
    "tars": tars,
}


def load_source(name: str, path: str | None = None, seed: int = 0, download: bool = False) -> Source:
    if name not in SOURCES:
        import difflib

        near = difflib.get_close_matches(name, list(SOURCES), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"unknown source '{name}'{hint}; choose from: {', '.join(SOURCES)}")
    return SOURCES[name](SourceOptions(path=path, seed=seed, download=download))


# ----------------------------------------------------------------------------------------------
# the split protocol


@dataclass
class Members:
    """The samples of one split as (pool, index) pairs, kept as two arrays: millions cost megabytes."""

    pools: list[Pool]
    pool_ids: np.ndarray  # int32, into `pools`
    indices: np.ndarray  # int64

    @classmethod
    def of(cls, *parts: tuple[Pool, np.ndarray]) -> "Members":
        parts = tuple((pool, np.asarray(idx, np.int64)) for pool, idx in parts if len(idx))
        return cls(
            [pool for pool, _ in parts],
            np.concatenate([np.full(len(idx), i, np.int32) for i, (_, idx) in enumerate(parts)]) if parts else np.zeros(0, np.int32),
            np.concatenate([idx for _, idx in parts]) if parts else np.zeros(0, np.int64),
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Pool, int]:
        return self.pools[self.pool_ids[i]], int(self.indices[i])

    def __iter__(self) -> Iterator[tuple[Pool, int]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return isinstance(other, Members) and list(self) == list(other)


@dataclass
class SplitPlan:
    """Which (pool, index) pairs go to each split. Unlabeled samples keep their truth for monitoring."""

    labeled: Members
    unlabeled: Members
    test: Members
    protocol: dict


def plan_splits(source: Source, labels_per_class: int | None, seed: int, test_fraction: float = 0.3) -> SplitPlan:
    """Class-balanced labeled split: `labels_per_class` of every class, the rest of the pool unlabeled.

    Sources without an official test split hold out a stratified `test_fraction` first, so the
    test split never overlaps the training pools. A source without labels makes only an unlabeled
    split; a source that comes split (re-sharding) keeps its splits.
    """
    everything = lambda pool: (pool, np.arange(pool.size))  # noqa: E731
    if source.given_splits is not None:
        if labels_per_class is not None:
            raise UserError(f"{source.protocol.get('resharded_from', 'this dataset')} is already split; drop --labels-per-class")
        given = {s: Members.of(everything(p)) for s, p in source.given_splits.items()}
        empty = Members.of()
        return SplitPlan(given.get("labeled", empty), given.get("unlabeled", empty), given.get("test", empty), dict(source.protocol))
    if source.train.labels is None:
        if labels_per_class is not None:
            raise UserError(f"source '{source.name}' has no labels: it makes only an unlabeled split; drop --labels-per-class")
        extra = [everything(source.extra_unlabeled)] if source.extra_unlabeled is not None else []
        return SplitPlan(Members.of(), Members.of(everything(source.train), *extra), Members.of(), {"labels_per_class": None, "seed": seed})
    if labels_per_class is None:
        raise UserError(f"source '{source.name}' needs --labels-per-class N (labeled samples drawn from each class)")
    if labels_per_class < 1:
        raise UserError(f"--labels-per-class must be at least 1; got {labels_per_class}")
    labels = source.train.labels
    if (labels < 0).any() or (labels >= source.num_classes).any():
        raise UserError(f"source '{source.name}' has labels outside 0..{source.num_classes - 1} in its training pool")
    rng = np.random.default_rng(seed)
    train_idx = np.arange(source.train.size)
    if source.test is None:
        if not 0 < test_fraction < 1:
            raise UserError(f"--test-fraction must be in (0, 1); got {test_fraction}")
        from sklearn.model_selection import train_test_split

        try:
            train_idx, test_idx = train_test_split(train_idx, test_size=test_fraction, stratify=labels, random_state=seed)
        except ValueError as exc:  # e.g. a class with a single member
            raise UserError(f"cannot hold out a stratified test split of '{source.name}': {exc}") from None
        test = Members.of((source.train, np.sort(test_idx)))
    else:
        test = Members.of(everything(source.test))
    labeled_idx = []
    for cls in range(source.num_classes):
        members = train_idx[labels[train_idx] == cls]
        if len(members) < labels_per_class:
            raise UserError(
                f"--labels-per-class {labels_per_class} is larger than class '{source.class_names[cls]}' has "
                f"({len(members)} in the training pool of '{source.name}')"
            )
        labeled_idx.extend(rng.choice(members, size=labels_per_class, replace=False).tolist())
    labeled_idx = np.sort(np.array(labeled_idx, np.int64))
    unlabeled_idx = np.setdiff1d(np.sort(train_idx), labeled_idx)
    extra = [everything(source.extra_unlabeled)] if source.extra_unlabeled is not None else []
    protocol = {"labels_per_class": labels_per_class, "seed": seed, "test_fraction": None if source.test else test_fraction}
    return SplitPlan(Members.of((source.train, labeled_idx)), Members.of((source.train, unlabeled_idx), *extra), test, protocol)
