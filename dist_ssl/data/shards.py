"""WebDataset shards on disk: writing a dataset, its manifests, and decoding one sample.

Layout written by `dist-ssl shards write SOURCE --out DIR`:

    DIR/labeled/labeled-000000.tar ...   + DIR/labeled/manifest.json
    DIR/unlabeled/unlabeled-000000.tar   + DIR/unlabeled/manifest.json
    DIR/test/test-000000.tar             + DIR/test/manifest.json

A sample is `KEY.png` (or `KEY.npy` for vector data) plus `KEY.cls` (labeled and test splits) or
`KEY.truth.cls` (unlabeled split: the hidden true label, for monitoring only; the training loop
never hands it to a method). Keys are `<origin>-<index>`, unique within a dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from dist_ssl.data.sources import Pool, Source, plan_splits
from dist_ssl.errors import UserError

FORMAT = "dist-ssl-shards/1"
SPLITS = ("labeled", "unlabeled", "test")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


# ----------------------------------------------------------------------------------------------
# manifests


@dataclass(frozen=True)
class ShardInfo:
    url: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """One split's manifest.json, with shard URLs resolved against the split folder."""

    root: Path
    data: dict

    @property
    def shards(self) -> list[ShardInfo]:
        return [ShardInfo(s["url"], s["num_samples"], s["bytes"], s["sha256"]) for s in self.data["shards"]]

    @property
    def num_samples(self) -> int:
        return int(self.data["num_samples"])

    @property
    def num_classes(self) -> int:
        return int(self.data["num_classes"])

    @property
    def kind(self) -> str:
        return self.data["input"]["kind"]

    @property
    def shape(self) -> tuple[int, ...]:
        """HWC for images, (D,) for vectors."""
        return tuple(self.data["input"]["shape"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """What a model sees: CHW for images, (D,) for vectors."""
        shape = self.shape
        return (shape[2], shape[0], shape[1]) if self.kind == "image" else shape

    def url(self, shard: ShardInfo) -> str:
        """A URL webdataset can open: absolute paths and `scheme:` URLs pass through."""
        if "://" in shard.url or shard.url.startswith("pipe:") or os.path.isabs(shard.url):
            return shard.url
        return str(self.root / shard.url)


def load_manifest(split_dir: str | Path) -> Manifest:
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserError(f"shard folder not found: {split_dir}")
    path = split_dir / "manifest.json"
    if not path.is_file():
        raise UserError(f"no manifest.json in {split_dir}: write shards with `dist-ssl shards write`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a dist-ssl manifest (format {FORMAT!r} expected)")
    return Manifest(split_dir, data)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# encoding and decoding one sample


def encode_input(array: np.ndarray, kind: str) -> tuple[str, bytes]:
    if kind == "vector":
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(array, np.float32), allow_pickle=False)
        return "npy", buffer.getvalue()
    from PIL import Image

    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "png", buffer.getvalue()


def _decode_image(data: bytes, channels: int):
    """Encoded image -> uint8 CHW tensor.

    torchvision's decoder is 8x faster than PIL on small images (15 vs 126 us for an 8x8 PNG), so
    it is used while it exists; torchvision 0.29 deprecated it in favour of torchcodec, and PIL
    takes over once it is gone.
    """
    import torch

    try:
        import warnings

        from torchvision.io import ImageReadMode, decode_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except ImportError:
        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
        array = np.array(image)
        return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())


def decode_sample(raw: dict, channels: int) -> dict:
    """Raw tar members -> {'key', 'input' (uint8 CHW or float32 [D]), 'label', 'truth', 'soft'}.

    Only the formats we write are decoded; pickles and other executable formats are never touched.
    """
    import torch

    key = raw.get("__key__", "?")
    sample = {"key": key, "label": None, "truth": None, "soft": None}
    for ext in IMAGE_EXTENSIONS:
        if ext in raw:
            sample["input"] = _decode_image(raw[ext], channels)
            break
    else:
        if "npy" in raw:
            array = np.load(io.BytesIO(raw["npy"]), allow_pickle=False)
            sample["input"] = torch.from_numpy(np.asarray(array, np.float32))
        else:
            raise ValueError(f"sample {key} has no image or npy member (members: {sorted(k for k in raw if not k.startswith('__'))})")
    if "cls" in raw:
        sample["label"] = int(raw["cls"])
    if "truth.cls" in raw:
        sample["truth"] = int(raw["truth.cls"])
    if "soft.npy" in raw:  # a soft pseudo-label: class probabilities (dist-ssl select --soft)
        sample["soft"] = torch.from_numpy(np.asarray(np.load(io.BytesIO(raw["soft.npy"]), allow_pickle=False), np.float32))
    return sample


# ----------------------------------------------------------------------------------------------
# writing


def write_split(
    items: Iterable[tuple[str, np.ndarray, int | None, int | None]],
    split_dir: Path,
    split: str,
    maxcount: int,
    header: dict,
) -> dict:
    """Write (key, array, label, truth) items as shards of at most `maxcount` samples + manifest."""
    import webdataset as wds

    split_dir.mkdir(parents=True, exist_ok=True)
    num_classes = header["num_classes"]
    shards: list[dict] = []
    histogram = np.zeros(num_classes, np.int64)
    truth_histogram = np.zeros(num_classes, np.int64)
    pending_labels: list[int] = []
    writer = None

    def on_shard_closed(fname: str) -> None:
        path = Path(fname)
        shards.append(
            {
                "url": path.name,
                "num_samples": writer.count,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
                "class_histogram": np.bincount(pending_labels, minlength=num_classes).tolist(),
            }
        )
        pending_labels.clear()

    count = 0
    for key, array, label, truth in items:
        if writer is None:  # ShardWriter opens its first file at once: only create it for a non-empty split
            # An integer mtime keeps tar headers plain ustar: float mtimes make tarfile add a PAX header to
            # every member, which doubles parsing time when reading. It also makes shards byte-reproducible.
            writer = wds.ShardWriter(str(split_dir / f"{split}-%06d.tar"), maxcount=maxcount, verbose=0, post=on_shard_closed, mtime=0)
        ext, payload = encode_input(array, header["input"]["kind"])
        sample = {"__key__": key, ext: payload}
        if label is not None:
            sample["cls"] = str(label).encode()
            histogram[label] += 1
            pending_labels.append(label)
        if truth is not None:
            sample["truth.cls"] = str(truth).encode()
            truth_histogram[truth] += 1
            pending_labels.append(truth)
        writer.write(sample)
        count += 1
    if writer is not None:
        writer.close()
    manifest = dict(header)
    manifest.update(
        split=split,
        num_samples=count,
        class_histogram=histogram.tolist() if split != "unlabeled" else None,
        truth_histogram=truth_histogram.tolist() if split == "unlabeled" else None,
        shards=shards,
    )
    _write_json_atomic(split_dir / "manifest.json", manifest)
    return manifest


def _channel_stats(items: list[tuple[Pool, int]], kind: str, limit: int = 20000, seed: int = 0) -> tuple[list, list]:
    """Per-channel mean/std (in [0, 1] units for images) over a sample of the training pools."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(items), size=min(limit, len(items)), replace=False) if items else []
    arrays = np.stack([np.asarray(items[i][0].read(items[i][1]), np.float64) for i in chosen])
    if kind == "image":
        arrays = arrays.reshape(-1, arrays.shape[-1]) / 255.0
    std = arrays.std(axis=0)
    return arrays.mean(axis=0).tolist(), np.where(std > 0, std, 1.0).tolist()


def write_dataset(
    source: Source,
    out: str | Path,
    labels_per_class: int,
    seed: int = 0,
    test_fraction: float = 0.3,
    maxcount: int = 10000,
) -> dict[str, dict]:
    """Split `source` class-balanced and write the three splits under `out`.

    Everything is written into a hidden sibling folder that is renamed to `out` at the end, so an
    interrupted write never leaves a folder that looks like a finished dataset.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output folder already exists and is not empty: {out} (choose another --out or remove it)")
    if maxcount < 1:
        raise UserError(f"--maxcount must be at least 1; got {maxcount}")
    plan = plan_splits(source, labels_per_class, seed, test_fraction)
    first = source.train.read(0)
    header = {
        "format": FORMAT,
        "source": source.name,
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "input": {"kind": source.kind, "encoding": "png" if source.kind == "image" else "npy", "shape": list(first.shape)},
        "protocol": {"labels_per_class": labels_per_class, "seed": seed, "test_fraction": None if source.test else test_fraction},
    }
    header["mean"], header["std"] = _channel_stats(plan.labeled + plan.unlabeled, source.kind, seed=seed)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    manifests = {}
    try:
        for split in SPLITS:
            members = getattr(plan, split)
            order = rng.permutation(len(members))  # shards are i.i.d. slices of the split

            def items(members=members, order=order, split=split):
                for i in order:
                    pool, index = members[i]
                    label = int(pool.labels[index]) if pool.labels is not None else None
                    key = f"{pool.origin}-{index:08d}"
                    if split == "unlabeled":
                        yield key, pool.read(index), None, label
                    else:
                        yield key, pool.read(index), label, None

            manifests[split] = write_split(items(), tmp / split, split, maxcount, header)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifests
