from collections import Counter
from itertools import islice

import pytest
import torch

from dist_ssl.config import AugmentConfig
from dist_ssl.data.shards import load_manifest
from dist_ssl.data.streams import EvalStream, TrainStream, loader, unit_samples
from dist_ssl.data.transforms import build_views
from dist_ssl.errors import UserError


def views_for(manifest, names=("weak", "strong")):
    views = build_views(manifest.kind, manifest.input_shape, manifest.data["mean"], manifest.data["std"], AugmentConfig())
    return {n: views[n] for n in names}


def stream(manifest, rank=0, world=1, workers=0, batch=8, state=None, seed=7):
    return TrainStream(manifest, batch, views_for(manifest), rank, world, workers, seed, shuffle_buffer=64, state=state)


def take(stream_, batches, n):
    out = []
    for batch in islice(batches, n):
        stream_.observe(batch)
        out.append(batch)
    return out


def same(a, b):
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    for x, y in zip(a, b):
        for view in x["inputs"]:
            assert torch.equal(x["inputs"][view], y["inputs"][view])
        assert torch.equal(x["truth"], y["truth"])


@pytest.mark.parametrize("split, world, workers", [("unlabeled", 3, 2), ("labeled", 3, 2), ("unlabeled", 1, 1), ("test", 2, 4)])
def test_a_data_epoch_reads_every_sample_exactly_once(digits_shards, split, world, workers):
    manifest = load_manifest(digits_shards / split)
    seen = Counter()
    for rank in range(world):
        s = stream(manifest, rank, world, workers)
        for consumer in range(rank * s.slots, (rank + 1) * s.slots):
            for unit in s.plan(consumer, epoch=0):
                seen.update(raw["__key__"] for _, raw in unit_samples(manifest, unit, s.seed, 0, s.shuffle_buffer))
    assert sum(seen.values()) == manifest.num_samples and max(seen.values()) == 1


def test_epochs_reshuffle(digits_shards):
    manifest = load_manifest(digits_shards / "unlabeled")
    s = stream(manifest)
    first = [raw["__key__"] for unit in s.plan(0, 0) for _, raw in unit_samples(manifest, unit, s.seed, 0, 64)]
    second = [raw["__key__"] for unit in s.plan(0, 1) for _, raw in unit_samples(manifest, unit, s.seed, 1, 64)]
    assert sorted(first) == sorted(second) and first != second


def test_resume_continues_with_exactly_the_same_batches(digits_shards):
    manifest = load_manifest(digits_shards / "unlabeled")
    reference = stream(manifest, batch=50)
    batches = iter(reference)
    take(reference, batches, 30)  # 1,500 samples: crosses a data epoch (1,207 samples)
    state = reference.state_dict()
    expected = take(reference, batches, 6)
    resumed = stream(manifest, batch=50, state=state)
    same(take(resumed, iter(resumed), 6), expected)


def test_resume_with_dataloader_worker_processes(digits_shards):
    manifest = load_manifest(digits_shards / "unlabeled")
    reference = stream(manifest, workers=2, batch=16)
    batches = iter(loader(reference, 2))
    take(reference, batches, 7)  # odd: the resumed loader must start with the other worker
    state = reference.state_dict()
    expected = take(reference, batches, 5)
    resumed = stream(manifest, workers=2, batch=16, state=state)
    same(take(resumed, iter(loader(resumed, 2)), 5), expected)


def test_augmentation_does_not_depend_on_workers(digits_shards):
    manifest = load_manifest(digits_shards / "labeled")
    by_key = {}
    for workers in (0, 2):
        s = stream(manifest, workers=workers, batch=5)
        for batch in islice(loader(s, workers), 10):  # 50 samples: one data epoch of the labeled split
            for i, key in enumerate(batch["keys"]):
                strong = batch["inputs"]["strong"][i]
                if key in by_key:
                    assert torch.equal(by_key[key], strong), key
                by_key[key] = strong
    assert len(by_key) == 50


def test_views_are_random_per_sample(digits_shards):
    manifest = load_manifest(digits_shards / "labeled")
    s = stream(manifest, batch=50)
    batch = next(iter(s))
    again = next(iter(stream(manifest, batch=50, seed=8)))  # another seed: other order, other augmentation
    index = {k: i for i, k in enumerate(again["keys"])}
    differs = sum(not torch.equal(batch["inputs"]["strong"][i], again["inputs"]["strong"][index[k]]) for i, k in enumerate(batch["keys"]))
    assert differs > 40
    assert batch["inputs"]["weak"].dtype == torch.float32 and batch["inputs"]["weak"].shape == (50, 1, 8, 8)


def test_resuming_on_another_layout_is_refused(digits_shards):
    manifest = load_manifest(digits_shards / "unlabeled")
    state = stream(manifest, rank=0, world=2).state_dict()
    with pytest.raises(UserError, match="it was read by 2 ranks x 1 workers, this run has 1 x 1"):
        stream(manifest, world=1, state=state)


def test_too_few_samples_for_the_consumers(digits_shards):
    manifest = load_manifest(digits_shards / "labeled")
    with pytest.raises(UserError, match="has 50 samples, fewer than the 32 ranks x 2 workers"):
        stream(manifest, world=32, workers=2)


@pytest.mark.parametrize("split, world, workers", [("test", 1, 0), ("test", 2, 2), ("test", 3, 1), ("labeled", 3, 2), ("test", 7, 0)])
def test_eval_stream_is_exactly_once(digits_shards, split, world, workers):
    manifest = load_manifest(digits_shards / split)
    view = build_views(manifest.kind, manifest.input_shape, manifest.data["mean"], manifest.data["std"], AugmentConfig())["plain"]
    seen = Counter()
    for rank in range(world):
        s = EvalStream(manifest, 32, view, rank, world)
        for batch in loader(s, min(workers, len(s.my_units()))):
            seen.update(batch["keys"])
    assert sum(seen.values()) == manifest.num_samples and max(seen.values()) == 1
