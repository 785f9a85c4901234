import json
import tarfile

import numpy as np
import pytest

from dist_ssl.data.shards import load_manifest, sha256_file, write_dataset
from dist_ssl.data.sources import load_source
from dist_ssl.data.streams import raw_samples
from dist_ssl.errors import UserError


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


def test_round_trip_counts_hashes_and_fields(digits_shards):
    seen_keys = {}
    for split in ("labeled", "unlabeled", "test"):
        manifest = load_manifest(digits_shards / split)
        assert manifest.num_samples == sum(s.num_samples for s in manifest.shards)
        keys = []
        for shard in manifest.shards:
            path = digits_shards / split / shard.url
            assert sha256_file(path) == shard.sha256 and path.stat().st_size == shard.bytes
            samples = list(raw_samples(str(path)))
            assert len(samples) == shard.num_samples
            keys += [s["__key__"] for s in samples]
            for sample in samples:
                # the hidden truth lives in its own field, only in the unlabeled split
                assert ("truth.cls" in sample) == (split == "unlabeled")
                assert ("cls" in sample) == (split != "unlabeled")
                assert "png" in sample
        assert len(keys) == len(set(keys)) == manifest.num_samples
        seen_keys[split] = set(keys)
    assert not seen_keys["labeled"] & seen_keys["unlabeled"]
    assert not seen_keys["test"] & (seen_keys["labeled"] | seen_keys["unlabeled"])
    labeled = load_manifest(digits_shards / "labeled")
    assert labeled.data["class_histogram"] == [5] * 10
    assert labeled.data["protocol"] == {"labels_per_class": 5, "seed": 0, "test_fraction": 0.3}
    assert sum(load_manifest(digits_shards / "unlabeled").data["truth_histogram"]) == 1797 - 540 - 50


def test_shards_are_reproducible(tmp_path):
    write_dataset(load_source("moons"), tmp_path / "a", labels_per_class=3, seed=4, maxcount=500)
    write_dataset(load_source("moons"), tmp_path / "b", labels_per_class=3, seed=4, maxcount=500)
    for split in ("labeled", "unlabeled", "test"):
        a, b = (json.loads((tmp_path / d / split / "manifest.json").read_text()) for d in "ab")
        assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_vector_samples_are_npy_without_pickle(tmp_path):
    write_dataset(load_source("moons"), tmp_path / "m", labels_per_class=3, seed=0)
    manifest = load_manifest(tmp_path / "m" / "labeled")
    assert manifest.kind == "vector" and manifest.shape == (2,) and manifest.num_samples == 6
    names = members(tmp_path / "m" / "labeled" / manifest.shards[0].url)
    assert all(n.endswith((".npy", ".cls")) for n in names)


def test_refuses_to_overwrite_a_dataset(digits_shards):
    before = sorted(p.name for p in digits_shards.iterdir())
    with pytest.raises(UserError, match="output folder already exists and is not empty"):
        write_dataset(load_source("digits"), digits_shards, labels_per_class=5)
    assert sorted(p.name for p in digits_shards.iterdir()) == before


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(UserError):
        write_dataset(load_source("digits"), tmp_path / "d", labels_per_class=500)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, message", [(None, "shard folder not found"), ("{}", "is not a dist-ssl manifest"), ("{", "is not valid JSON")])
def test_bad_manifests(tmp_path, content, message):
    folder = tmp_path / "split"
    if content is not None:
        folder.mkdir()
        (folder / "manifest.json").write_text(content)
    with pytest.raises(UserError, match=message):
        load_manifest(folder)


def test_decoded_images_match_the_source(digits_shards):
    from dist_ssl.data.shards import decode_sample

    source = load_source("digits")
    raw = next(raw_samples(str(digits_shards / "test" / "test-000000.tar")))
    sample = decode_sample(raw, channels=1)
    index = int(sample["key"].split("-")[1])
    assert np.array_equal(sample["input"][0].numpy(), source.train.read(index)[..., 0])
    assert sample["label"] == source.train.labels[index]
