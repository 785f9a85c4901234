import torch

from dist_ssl.config import AugmentConfig
from dist_ssl.data.transforms import VIEW_NAMES, build_views


def test_vector_views_standardize_with_the_training_statistics_and_do_not_augment():
    views = build_views("vector", (2,), [0.5, 0.25], [0.875, 0.5], None)
    point = torch.tensor([1.375, -0.25])
    expected = torch.tensor([1.0, -1.0])
    for name in VIEW_NAMES:
        assert torch.equal(views[name](point), expected), name


def test_vector_noise_jitters_the_strong_view_only_by_that_many_feature_stds():
    views = build_views("vector", (2,), [0.5, 0.25], [0.875, 0.5], AugmentConfig(vector_noise=0.4))
    point = torch.tensor([1.375, -0.25])
    assert torch.equal(views["plain"](point), torch.tensor([1.0, -1.0]))
    assert torch.equal(views["weak"](point), torch.tensor([1.0, -1.0]))
    torch.manual_seed(0)
    strong = torch.stack([views["strong"](point) for _ in range(4000)])
    # standardized, the noise is N(0, 0.4^2) on each feature whatever the feature's own scale
    assert torch.allclose(strong.mean(0), torch.tensor([1.0, -1.0]), atol=0.03)
    assert torch.allclose(strong.std(0), torch.tensor([0.4, 0.4]), atol=0.02)
    torch.manual_seed(7)
    first = views["strong"](point)
    torch.manual_seed(7)
    assert torch.equal(views["strong"](point), first)  # the stream's per-sample seed decides it
