"""Batched views (data/device_views.py): per-sample randomness, each op against torchvision's, and
the same views as the reference per-sample path, bit for bit."""

from itertools import islice

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dist_ssl.config import AugmentConfig
from dist_ssl.data import device_views
from dist_ssl.data.device_views import (
    BatchedImageView,
    build_batched_views,
    crop_and_flip,
    cutout,
    on_device,
)
from dist_ssl.data.shards.manifest import load_manifest
from dist_ssl.data.loading import loader
from dist_ssl.data.streams import TrainStream, mix
from dist_ssl.data.transforms import build_views, normalization

CIFAR = AugmentConfig(flip=True)  # pad 4 at 32 px, RandAugment 2 ops at magnitude 10, cutout 0.5
SHAPES = [((3, 32, 32), CIFAR), ((1, 8, 8), AugmentConfig(randaugment_magnitude=5)),
          ((3, 12, 16), AugmentConfig(crop_padding=0.25, flip=True, randaugment_ops=3, cutout=0.3))]


def images(n, shape, seed=0):
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def both_paths(shape, augment, name, batch, seeds):
    """(reference views, batched views) of `batch` with sample i under seed seeds[i]."""
    mean, std = [0.4] * shape[0], [0.2] * shape[0]
    reference = build_views("image", shape, mean, std, augment)[name]
    batched = build_batched_views("image", shape, mean, std, augment)[name]
    generator = torch.default_generator
    outputs, draws = [], []
    for image, seed in zip(batch, seeds):
        generator.manual_seed(seed)
        outputs.append(reference.per_sample(image))
        generator.manual_seed(seed)
        draws.append(batched.draw())
    return reference.batch(torch.stack(outputs)), batched.apply(batch, batched.plan(draws))


@pytest.mark.parametrize("shape, augment", SHAPES)
@pytest.mark.parametrize("name", ["plain", "weak", "strong"])
def test_the_batched_view_of_a_sample_is_its_reference_view_bit_for_bit(shape, augment, name):
    batch = images(600, shape)
    seeds = [mix(3, i) for i in range(len(batch))]
    reference, batched = both_paths(shape, augment, name, batch, seeds)
    assert batched.dtype == torch.float32 and batched.shape == batch.shape
    differing = (reference != batched).flatten(1).any(1).nonzero().flatten().tolist()
    assert differing == []


def test_two_identical_images_in_one_batch_get_different_strong_views():
    batch = images(1, (3, 32, 32)).expand(16, 3, 32, 32).contiguous()
    _, views = both_paths((3, 32, 32), CIFAR, "strong", batch, [mix(5, i) for i in range(16)])
    distinct = {tuple(v.flatten().tolist()) for v in views}
    assert len(distinct) == 16


def test_a_view_depends_on_its_seed_not_on_the_batch_it_is_in():
    batch = images(64, (3, 32, 32))
    seeds = [mix(11, i) for i in range(64)]
    _, whole = both_paths((3, 32, 32), CIFAR, "strong", batch, seeds)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:23]
    _, part = both_paths((3, 32, 32), CIFAR, "strong", batch[order], [seeds[i] for i in order])
    assert torch.equal(part, whole[order])


def test_values_stay_in_range_and_uint8_ops_keep_uint8():
    batch = images(200, (3, 32, 32))
    view = build_batched_views("image", (3, 32, 32), [0.0] * 3, [1.0] * 3, CIFAR)["strong"]
    torch.manual_seed(0)
    out = view.apply(batch, view.plan([view.draw() for _ in batch]))
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1  # mean 0, std 1: [0, 1]


# -- each op against torchvision's functional op, on single samples ---------------------------------


@pytest.mark.parametrize("pad, flip", [(4, False), (4, True), (1, True), (0, False)])
def test_crop_and_flip_matches_torchvision_pad_crop_and_flip(pad, flip):
    batch = images(30, (3, 12, 16))
    g = torch.Generator().manual_seed(pad)
    crop = torch.stack([torch.randint(0, 2 * pad + 1, (30,), generator=g), torch.randint(0, 2 * pad + 1, (30,), generator=g),
                        torch.randint(0, 2, (30,), generator=g) if flip else torch.zeros(30, dtype=torch.long)], 1)
    out = crop_and_flip(batch, crop, pad)
    for image, (top, left, flipped), got in zip(batch, crop.tolist(), out):
        expected = F.crop(F.pad(image, [pad], padding_mode="reflect"), top, left, 12, 16)
        if flipped:
            expected = F.horizontal_flip(expected)
        assert torch.equal(got, expected)


def test_cutout_matches_torchvision_erase():
    batch = images(20, (3, 32, 32))
    boxes = torch.tensor([[i % 20, (3 * i) % 25, 1 + i % 12, 1 + i % 12] for i in range(19)] + [[0, 0, 0, 0]])
    out = cutout(batch, boxes, [125, 123, 114])
    for image, (i, j, h, w), got in zip(batch, boxes.tolist(), out):
        expected = F.erase(image, i, j, h, w, torch.tensor([125, 123, 114], dtype=torch.uint8)[:, None, None]) if h else image
        assert torch.equal(got, expected)


def _functional(name, image, magnitude):
    """RandAugment's ops spelled with torchvision's public functional API, nearest interpolation."""
    nearest = InterpolationMode.NEAREST
    shear = lambda s: F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=s, interpolation=nearest, fill=None, center=[0, 0])  # noqa: E731
    translate = lambda t: F.affine(image, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0], interpolation=nearest, fill=None)  # noqa: E731
    import math

    return {
        "Identity": lambda: image,
        "ShearX": lambda: shear([math.degrees(math.atan(magnitude)), 0.0]),
        "ShearY": lambda: shear([0.0, math.degrees(math.atan(magnitude))]),
        "TranslateX": lambda: translate([int(magnitude), 0]),
        "TranslateY": lambda: translate([0, int(magnitude)]),
        "Rotate": lambda: F.rotate(image, magnitude, interpolation=nearest, fill=None),
        "Brightness": lambda: F.adjust_brightness(image, 1.0 + magnitude),
        "Color": lambda: F.adjust_saturation(image, 1.0 + magnitude),
        "Contrast": lambda: F.adjust_contrast(image, 1.0 + magnitude),
        "Sharpness": lambda: F.adjust_sharpness(image, 1.0 + magnitude),
        "Posterize": lambda: F.posterize(image, int(magnitude)),
        "Solarize": lambda: F.solarize(image, 255.0 * magnitude),
        "AutoContrast": lambda: F.autocontrast(image),
        "Equalize": lambda: F.equalize(image),
    }[name]()


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8)])
def test_each_randaugment_op_on_a_group_matches_torchvision_on_each_sample(shape):
    view = BatchedImageView(shape[1], shape[2], 0, False, 1, 10, 0.0, [0] * shape[0], normalization([0.5] * shape[0], [0.5] * shape[0]))
    group = images(12, shape, seed=3)
    for op, spec in enumerate(view.ops):
        for negative in (0, 1) if spec.signed else (0,):
            out = view._randaugment_op(group.clone(), op, negative)
            magnitude = -spec.magnitude if negative else spec.magnitude
            for image, got in zip(group, out):
                expected = _functional(spec.name, image, magnitude)
                assert (got.int() - expected.int()).abs().max() <= 0, (spec.name, negative)


# -- through the streams -----------------------------------------------------------------------------


def _views(manifest, batched):
    build = build_batched_views if batched else build_views
    views = build(manifest.kind, manifest.input_shape, manifest.data["mean"], manifest.data["std"], AugmentConfig())
    return {n: views[n] for n in ("weak", "strong")}


def _by_key(manifest, batched, world=1, workers=0, batch=8, batches=6):
    """key -> (weak, strong) over the first batches of every rank's stream."""
    found = {}
    for rank in range(world):
        stream = TrainStream(manifest, batch, _views(manifest, batched), rank, world, workers, seed=7, shuffle_buffer=64)
        for item in islice(loader(stream, workers), batches):
            views = on_device(item, stream.views, torch.device("cpu"))
            for i, key in enumerate(item["keys"]):
                found[(int(item["epoch"][i]), key)] = (views["weak"][i], views["strong"][i])
    return found


def test_a_samples_view_is_the_same_whatever_the_path_batch_size_workers_or_ranks(digits_shards):
    manifest = load_manifest(digits_shards / "unlabeled")
    reference = _by_key(manifest, batched=False, batches=20)
    for layout in [dict(), dict(batch=5), dict(workers=2), dict(world=2, workers=1, batches=8)]:
        found = _by_key(manifest, batched=True, **layout)
        common = found.keys() & reference.keys()
        assert len(common) >= 30, layout
        for key in common:
            assert torch.equal(found[key][0], reference[key][0]) and torch.equal(found[key][1], reference[key][1]), (layout, key)


def test_workers_ship_uint8_samples_and_parameters_not_float_views(digits_shards):
    manifest = load_manifest(digits_shards / "unlabeled")
    stream = TrainStream(manifest, 8, _views(manifest, True), 0, 1, 1, seed=7, shuffle_buffer=64)
    item = next(iter(loader(stream, 1)))
    assert "inputs" not in item and item["decoded"].dtype == torch.uint8 and item["decoded"].shape == (8, 1, 8, 8)
    assert set(item["plans"]) == {"weak", "strong"} and item["plans"]["strong"]["crop"].shape == (8, 3)


def test_vector_noise_is_drawn_per_sample_and_matches_the_reference():
    mean, std = [0.5, -1.0], [2.0, 0.5]
    augment = AugmentConfig(vector_noise=0.3)
    reference = build_views("vector", (2,), mean, std, augment)["strong"]
    batched = build_batched_views("vector", (2,), mean, std, augment)["strong"]
    points = torch.randn(10, 2)
    outs, draws = [], []
    for i, point in enumerate(points):
        torch.manual_seed(i)
        outs.append(reference.per_sample(point))
        torch.manual_seed(i)
        draws.append(batched.draw())
    assert torch.equal(batched.apply(points, batched.plan(draws)), reference.batch(torch.stack(outs)))


def test_the_prefetcher_counts_the_time_it_waits_for_data():
    def slow():
        import time

        for i in range(3):
            time.sleep(0.05)
            yield {"x": torch.tensor(i)}

    prefetcher = device_views.Prefetcher(slow(), torch.device("cpu"))
    assert int(prefetcher.next()["x"]) == 0 and int(prefetcher.next()["x"]) == 1
    assert prefetcher.waited >= 0.14  # the first batch, and the two fetched ahead
