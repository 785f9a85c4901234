import gzip
import math
import struct

import numpy as np
import pytest

from dist_ssl.data.sources import FASHION_MNIST_DIR, load_source, plan_splits
from dist_ssl.errors import UserError


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path):
    """A tiny Fashion-MNIST in the original idx.gz layout."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


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
