"""Every source, from its real on-disk layout (small fakes) through shards and back, sample by sample."""

import gzip
import hashlib
import http.server
import math
import threading
from functools import partial

import numpy as np
import pytest
import webdataset as wds

from dist_ssl.data.shards.codec import decode_sample
from dist_ssl.data.shards.manifest import load_manifest
from dist_ssl.data.shards.tar import raw_samples
from dist_ssl.data.shards.writer import write_dataset
from dist_ssl.data.sources import FASHION_MNIST_DIR, load_source, plan_splits
from dist_ssl.errors import UserError
from tests.data.conftest import (
    fake_cifar,
    fake_idx,
    fake_imagefolder,
    fake_stl10,
    fake_svhn,
    png_bytes,
    write_png,
)


def pools_by_key(source):
    pools = [source.train, source.test, source.extra_unlabeled, *(source.given_splits or {}).values()]
    return {pool.key(i): (pool, i) for pool in pools if pool is not None for i in range(pool.size)}


def assert_round_trip(source, out, splits=("labeled", "unlabeled", "test")):
    """Every written sample decodes to exactly the source's pixels and label; every source sample is written once."""
    by_key = pools_by_key(source)
    written = []
    for split in splits:
        manifest = load_manifest(out / split)
        assert manifest.data["source"] == source.name and manifest.num_classes == source.num_classes
        for shard in manifest.shards:
            for raw in raw_samples(manifest.url(shard), shard):
                sample = decode_sample(raw, manifest.channels)
                pool, index = by_key[sample["key"]]
                expected = pool.read(index)
                got = sample["input"].numpy()
                assert np.array_equal(got.transpose(1, 2, 0) if manifest.kind == "image" else got, expected), sample["key"]
                label = None if pool.labels is None else int(pool.labels[index])
                assert (sample["truth"] if split == "unlabeled" else sample["label"]) == label
                written.append(sample["key"])
    assert sorted(written) == sorted(by_key)


@pytest.mark.parametrize("name, make, labels_per_class, counts", [
    ("mnist", lambda root: fake_idx(root / "MNIST" / "raw", ext=""), 3, (30, 30, 20)),  # torchvision's layout, unpacked
    ("fashion-mnist", lambda root: fake_idx(root), 3, (30, 30, 20)),  # Debian's layout
    ("cifar10", lambda root: fake_cifar(root, 10), 2, (20, 30, 20)),
    ("cifar100", lambda root: fake_cifar(root, 100, train=200, test=100), 1, (100, 100, 100)),
    ("svhn", lambda root: fake_svhn(root), 2, (20, 20, 20)),
    ("stl10", lambda root: fake_stl10(root), 2, (20, 10 + 25, 20)),  # unlabeled = rest of train + the unlabeled split
    ("imagefolder", lambda root: fake_imagefolder(root), 4, (12, 13, 11)),  # 30% stratified test hold-out
])
def test_round_trip(tmp_path, name, make, labels_per_class, counts):
    make(tmp_path / "src")
    source = load_source(name, path=str(tmp_path / "src"))
    manifests = write_dataset(source, tmp_path / "out", labels_per_class, maxcount=16)
    assert tuple(manifests[s]["num_samples"] for s in ("labeled", "unlabeled", "test")) == counts
    assert manifests["labeled"]["class_histogram"] == [labels_per_class] * source.num_classes
    assert_round_trip(source, tmp_path / "out")


def test_stl10_is_read_lazily_from_a_memory_map(tmp_path):
    source = load_source("stl10", path=str(fake_stl10(tmp_path)))
    assert source.extra_unlabeled.size == 25 and source.extra_unlabeled.labels is None
    raw = np.fromfile(tmp_path / "stl10_binary" / "unlabeled_X.bin", np.uint8).reshape(-1, 3, 96, 96)
    assert np.array_equal(source.extra_unlabeled.read(7), raw[7].transpose(2, 1, 0))  # column-major on disk
    assert source.class_names[0] == "airplane" and source.train.labels[:3].tolist() == [0, 1, 2]


def test_svhn_maps_label_10_to_digit_0(tmp_path):
    source = load_source("svhn", path=str(fake_svhn(tmp_path)))
    assert source.train.labels[:3].tolist() == [0, 1, 2] and source.train.read(0).shape == (32, 32, 3)


def test_unlabeled_images_make_only_an_unlabeled_split(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(7):
        write_png(tmp_path / "pool" / f"day{i % 2}" / f"frame.{i}.png", rng.integers(0, 256, (20, 12, 3), dtype=np.uint8))
    (tmp_path / "pool" / "notes.txt").write_text("not an image")
    source = load_source("images", path=str(tmp_path / "pool"))
    with pytest.raises(UserError, match="has no labels: it makes only an unlabeled split; drop --labels-per-class"):
        write_dataset(source, tmp_path / "x", labels_per_class=2)
    manifests = write_dataset(source, tmp_path / "out", None)
    assert list(manifests) == ["unlabeled"] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["unlabeled"]
    manifest = manifests["unlabeled"]
    assert manifest["num_classes"] == 0 and manifest["truth_histogram"] == [] and manifest["num_samples"] == 7
    assert "day0/frame_0" in pools_by_key(source)  # keys: paths below the root, dots made underscores
    assert_round_trip(source, tmp_path / "out", splits=("unlabeled",))


def test_resize_and_channels_give_every_image_one_shape(tmp_path):
    rng = np.random.default_rng(0)
    write_png(tmp_path / "src" / "a" / "0.png", rng.integers(0, 256, (40, 30, 1), dtype=np.uint8))  # grey, portrait
    for i in range(1, 6):
        for name in "ab":
            write_png(tmp_path / "src" / name / f"{i}.png", rng.integers(0, 256, (24 + i, 50, 3), dtype=np.uint8))
    source = load_source("imagefolder", path=str(tmp_path / "src"))
    with pytest.raises(UserError, match=r"has shape \[\d+, \d+, 1\], the first has \[\d+, \d+, 1\]: pass --resize N"):
        write_dataset(source, tmp_path / "x", 2, channels=1)
    assert not (tmp_path / "x").exists()
    manifests = write_dataset(source, tmp_path / "out", 2, resize=16, channels=3)
    assert manifests["labeled"]["input"] == {"kind": "image", "encoding": "png", "shape": [16, 16, 3], "resize": 16}
    for split in ("labeled", "unlabeled", "test"):
        manifest = load_manifest(tmp_path / "out" / split)
        for shard in manifest.shards:
            assert all(decode_sample(raw, 3)["input"].shape == (3, 16, 16) for raw in raw_samples(manifest.url(shard)))


def test_unreadable_images_are_skipped_in_the_unlabeled_pool_only(tmp_path):
    fake_imagefolder(tmp_path / "src", per_class=10)
    (tmp_path / "src" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    source = load_source("imagefolder", path=str(tmp_path / "src"))
    index = [source.train.key(i) for i in range(source.train.size)].index("cat/broken")
    plan = plan_splits(source, 2, seed=0)
    where = next(s for s in ("labeled", "unlabeled", "test") if index in [i for _, i in getattr(plan, s)])
    if where == "unlabeled":
        manifests = write_dataset(source, tmp_path / "out", 2)
        assert [s["key"] for s in manifests["unlabeled"]["skipped"]] == ["cat/broken"]
        assert manifests["unlabeled"]["num_samples"] == len(plan.unlabeled) - 1
    else:
        with pytest.raises(UserError, match=f"cannot read sample cat/broken of 'imagefolder' for the {where} split"):
            write_dataset(source, tmp_path / "out", 2)
    images = load_source("images", path=str(tmp_path / "src"))
    manifests = write_dataset(images, tmp_path / "pool", None)
    assert [s["key"] for s in manifests["unlabeled"]["skipped"]] == ["cat/broken"]


def test_resharding_a_dataset_keeps_splits_keys_and_bytes(digits_shards, tmp_path):
    source = load_source("tars", path=str(digits_shards))
    assert set(source.given_splits) == {"labeled", "unlabeled", "test"}
    with pytest.raises(UserError, match="is already split; drop --labels-per-class"):
        write_dataset(source, tmp_path / "x", 5)
    same = write_dataset(source, tmp_path / "same", None, maxcount=100)
    finer = write_dataset(source, tmp_path / "finer", None, maxcount=7, encoding="raw")
    for split in ("labeled", "unlabeled", "test"):
        old = load_manifest(digits_shards / split).data
        assert [s["sha256"] for s in same[split]["shards"]] == [s["sha256"] for s in old["shards"]]
        assert finer[split]["num_samples"] == old["num_samples"] and all(s["num_samples"] <= 7 for s in finer[split]["shards"])
        assert finer[split]["protocol"]["labels_per_class"] == 5 and finer[split]["protocol"]["resharded_from"] == str(digits_shards)
        assert finer[split]["class_histogram" if split != "unlabeled" else "truth_histogram"] == old["class_histogram" if split != "unlabeled" else "truth_histogram"]
    assert_round_trip(source, tmp_path / "finer")


def test_foreign_webdataset_tars_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "tars").mkdir()
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / "tars" / f"part-{shard}.tar")) as writer:
            for i in range(15):
                writer.write({"__key__": f"s{shard}/{i:04d}", "jpg": png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
                              "cls": str(i % 3).encode(), "json": b"{}"})
    source = load_source("tars", path=str(tmp_path / "tars"))
    assert source.num_classes == 3 and source.train.size == 30 and source.given_splits is None
    write_dataset(source, tmp_path / "out", 4, maxcount=8)
    assert_round_trip(source, tmp_path / "out")


def test_mnist_download_goes_through_torchvision(tmp_path, monkeypatch):
    """torchvision's real download code, served from 127.0.0.1 (no internet here)."""
    import torchvision.datasets

    served = fake_idx(tmp_path / "served", ext=".gz", train=20, test=10)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        files = sorted(p.name for p in served.iterdir())
        monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
        monkeypatch.setattr(torchvision.datasets.MNIST, "resources", [(f, hashlib.md5((served / f).read_bytes()).hexdigest()) for f in files])
        with pytest.raises(UserError, match="idx files not found .*pass --download"):
            load_source("mnist", path=str(tmp_path / "data"))
        source = load_source("mnist", path=str(tmp_path / "data"), download=True)
    finally:
        server.shutdown()
    assert (tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert source.train.size == 20 and source.test.size == 10


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "stl10", "mnist", "imagefolder", "images", "tars"])
def test_missing_files_are_one_clear_error(tmp_path, name):
    with pytest.raises(UserError, match=f"source '{name}' needs --path"):
        load_source(name)
    with pytest.raises(UserError, match="not found|no .tar files|pass --download"):
        load_source(name, path=str(tmp_path / "nothing-here"))


def test_digits_is_embedded_and_scaled_to_bytes():
    source = load_source("digits")
    assert source.train.size == 1797 and source.num_classes == 10 and source.test is None
    image = source.train.read(0)
    assert image.shape == (8, 8, 1) and image.dtype == np.uint8
    assert max(source.train.read(i).max() for i in range(50)) == 255  # 16 -> 255


def test_moons_follows_the_seed_protocol():
    source = load_source("moons", seed=3)
    assert source.kind == "vector" and source.train.size == 2000 and source.train.read(0).shape == (2,)
    assert np.bincount(source.train.labels).tolist() == [1000, 1000]


def test_fashion_mnist_reads_idx_files(fake_fashion):
    source = load_source("fashion-mnist", path=str(fake_fashion))
    assert source.train.size == 60 and source.test.size == 20
    assert source.train.read(5).shape == (28, 28, 1) and source.train.labels[5] == 5


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    source = load_source("fashion-mnist")
    assert source.train.size == 60000 and source.test.size == 10000
    assert np.bincount(source.test.labels).tolist() == [1000] * 10


def test_truncated_idx_file_is_one_clear_error(fake_fashion):
    path = fake_fashion / "t10k-images-idx3-ubyte.gz"
    raw = gzip.open(path).read()
    with gzip.open(path, "wb") as handle:
        handle.write(raw[:-100])
    with pytest.raises(UserError, match="is truncated"):
        load_source("fashion-mnist", path=str(fake_fashion))


def test_unknown_source_names_the_closest():
    with pytest.raises(UserError, match="unknown source 'digit' \\(did you mean 'digits'\\?\\)"):
        load_source("digit")


def test_split_plan_is_class_balanced_disjoint_and_seeded():
    source = load_source("digits")
    plan = plan_splits(source, labels_per_class=5, seed=0)
    labeled = [i for _, i in plan.labeled]
    assert np.bincount(source.train.labels[labeled], minlength=10).tolist() == [5] * 10
    unlabeled = {i for _, i in plan.unlabeled}
    test = {i for _, i in plan.test}
    assert not (set(labeled) & unlabeled) and not (set(labeled) & test) and not (unlabeled & test)
    assert len(labeled) + len(unlabeled) + len(test) == 1797
    assert len(test) == math.ceil(0.3 * 1797)
    assert plan_splits(source, 5, seed=0).labeled == plan.labeled
    assert plan_splits(source, 5, seed=1).labeled != plan.labeled


def test_labels_per_class_larger_than_a_class():
    with pytest.raises(UserError, match="--labels-per-class 200 is larger than class '0' has"):
        plan_splits(load_source("digits"), labels_per_class=200, seed=0)
    with pytest.raises(UserError, match="source 'digits' needs --labels-per-class N"):
        plan_splits(load_source("digits"), labels_per_class=None, seed=0)


def test_two_files_that_would_share_a_key_are_one_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.b.png", "a_b.jpg"):
        write_png(tmp_path / "pool" / name, rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    with pytest.raises(UserError, match=r"a.b.png and .*a_b.jpg would both be sample a_b \(rename one\)"):
        load_source("images", path=str(tmp_path / "pool"))
