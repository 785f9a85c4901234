"""Small fakes of every source in its real on-disk layout, and helpers to damage or re-pack shards."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from dist_ssl.data.shards.manifest import sha256_file
from dist_ssl.data.shards.tar import raw_samples


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def fake_idx(root: Path, ext: str = ".gz", train: int = 60, test: int = 20) -> Path:
    """MNIST / Fashion-MNIST: the four idx files (Debian: .gz in one folder; torchvision: NAME/raw/)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)
    return root


def fake_cifar(root: Path, classes: int = 10, train: int = 50, test: int = 20) -> Path:
    """CIFAR's python batches (torchvision's download, unpacked): pickled dicts of uint8 rows."""
    rng = np.random.default_rng(1)
    if classes == 10:
        folder, label_key, files, meta = root / "cifar-10-batches-py", "labels", [f"data_batch_{i}" for i in range(1, 6)], ("batches.meta", "label_names")
    else:
        folder, label_key, files, meta = root / "cifar-100-python", "fine_labels", ["train"], ("meta", "fine_label_names")
    folder.mkdir(parents=True)
    per_file = train // len(files)
    for name, n in [(f, per_file) for f in files] + [("test_batch" if classes == 10 else "test", test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: [int(v) for v in np.arange(n) % classes]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / meta[0]).write_bytes(pickle.dumps({meta[1]: [f"class{c}" for c in range(classes)]}))
    return root


def fake_svhn(root: Path, train: int = 40, test: int = 20) -> Path:
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    for origin, n in (("train", train), ("test", test)):
        labels = (np.arange(n) % 10)
        labels[labels == 0] = 10  # SVHN stores the digit 0 as 10
        savemat(str(root / f"{origin}_32x32.mat"), {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": labels.reshape(-1, 1)})
    return root


def fake_stl10(root: Path, train: int = 30, test: int = 20, unlabeled: int = 25) -> Path:
    """stl10_binary/: column-major 3x96x96 uint8 images, labels 1..10."""
    rng = np.random.default_rng(3)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for origin, n in (("train", train), ("test", test), ("unlabeled", unlabeled)):
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{origin}_X.bin")
        if origin != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{origin}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]))
    return root


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def fake_imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 12, size=(16, 16), channels: int = 3) -> Path:
    rng = np.random.default_rng(4)
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_png(root / name / ("sub" if i % 3 == 0 else "") / f"img.{i}.png", rng.integers(0, 256, (*size, channels), dtype=np.uint8))
    return root


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Per-sample augmentation of 8x8 digits in the test process: with two intra-op threads on a loaded
    2-core machine every tiny op waits on a thread barrier (4 ms instead of 3 us for a pad, measured).
    DataLoader workers run with one thread anyway."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_fashion(tmp_path):
    return fake_idx(tmp_path / "fashion")


# ----------------------------------------------------------------------------------------------
# shards: re-packing and damaging


def repack(split_dir: Path, sizes: list[int]) -> None:
    """Rewrite a split's samples (same order) into shards of the given sizes (0 = an empty shard)
    and update its manifest: uneven shards, as a user's own writer may produce."""
    import webdataset as wds

    manifest = json.loads((split_dir / "manifest.json").read_text())
    samples = [raw for shard in manifest["shards"] for raw in raw_samples(str(split_dir / shard["url"]))]
    assert sum(sizes) == len(samples)
    for shard in manifest["shards"]:
        (split_dir / shard["url"]).unlink()
    entries, start = [], 0
    label_key = "truth.cls" if manifest["split"] == "unlabeled" else "cls"
    for i, size in enumerate(sizes):
        name = f"uneven-{i:06d}.tar"
        with wds.TarWriter(str(split_dir / name), mtime=0) as writer:
            for raw in samples[start : start + size]:
                writer.write({k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")})
        labels = [int(raw[label_key]) for raw in samples[start : start + size]]
        entries.append({"url": name, "num_samples": size, "bytes": (split_dir / name).stat().st_size,
                        "sha256": sha256_file(split_dir / name), "class_histogram": np.bincount(labels, minlength=manifest["num_classes"]).tolist()})
        start += size
    manifest["shards"] = entries
    (split_dir / "manifest.json").write_text(json.dumps(manifest))


def rewrite_shard(split_dir: Path, index: int, change, update_manifest: bool = True) -> None:
    """Apply `change(raw_sample_list) -> raw_sample_list` to one shard; optionally make the manifest
    agree with the new bytes (so only the damage inside the samples remains)."""
    import webdataset as wds

    manifest = json.loads((split_dir / "manifest.json").read_text())
    entry = manifest["shards"][index]
    path = split_dir / entry["url"]
    samples = change(list(raw_samples(str(path))))
    with wds.TarWriter(str(path), mtime=0) as writer:
        for raw in samples:
            writer.write({k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")})
    if update_manifest:
        entry.update(bytes=path.stat().st_size, sha256=sha256_file(path), num_samples=len(samples))
        (split_dir / "manifest.json").write_text(json.dumps(manifest))


def corrupt_png(raw: dict) -> dict:
    """A sample whose PNG is cut short: the tar is fine, the image is not."""
    return dict(raw, png=raw["png"][: len(raw["png"]) // 2])


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
