import torch

from dist_ssl.data.transforms import VIEW_NAMES, build_views


def test_vector_views_standardize_with_the_training_statistics_and_do_not_augment():
    views = build_views("vector", (2,), [0.5, 0.25], [0.875, 0.5], None)
    point = torch.tensor([1.375, -0.25])
    expected = torch.tensor([1.0, -1.0])
    for name in VIEW_NAMES:
        assert torch.equal(views[name](point), expected), name
