"""FlexMatch's formulas against a hand computation: a pool of 6 samples, 3 classes, tau = 0.95."""

import pytest
import torch

from dist_ssl.config import load_config
from dist_ssl.errors import UserError
from dist_ssl.methods import METHODS
from dist_ssl.methods.base import StepContext, TrainBatch
from dist_ssl.methods.flexmatch import class_thresholds
from tests.methods.test_freematch import identity_net

STATUS = [0, 0, 1, -1, -1, -1]  # sigma = [2, 1, 0]; 3 samples without a confident prediction


def flexmatch(*overrides, pool_size=6, num_classes=3):
    cfg = load_config(None, ["method.name=flexmatch", *overrides])
    return METHODS["flexmatch"](cfg, {"model": identity_net()}, num_classes, pool_size=pool_size)


def context():
    return StepContext(0, 0.0, 10, lambda name, loss: None)


def test_class_thresholds_with_and_without_the_warmup():
    status = torch.tensor(STATUS, dtype=torch.int8)
    # warm-up: beta = sigma / max(2, 6 - 3) = [2/3, 1/3, 0]; M(x) = x / (2 - x) = [1/2, 1/5, 0]
    assert class_thresholds(status, 3, 0.95, warmup=True).tolist() == pytest.approx([0.475, 0.19, 0.0], rel=1e-12)
    # without: beta = sigma / 2 = [1, 1/2, 0]; M = [1, 1/3, 0]
    assert class_thresholds(status, 3, 0.95, warmup=False).tolist() == pytest.approx([0.95, 0.95 / 3, 0.0], rel=1e-12)
    # nothing confident yet: every threshold is 0, so the first mask keeps everything
    nothing = torch.full((6,), -1, dtype=torch.int8)
    assert class_thresholds(nothing, 3, 0.95, True).tolist() == [0.0] * 3 == class_thresholds(nothing, 3, 0.95, False).tolist()


def test_a_step_masks_with_the_previous_status_then_records_confident_predictions():
    method = flexmatch()
    method.status = torch.tensor(STATUS, dtype=torch.int8)
    weak = torch.tensor([[0.96, 0.02, 0.02], [0.1, 0.85, 0.05], [0.44, 0.3, 0.26], [0.01, 0.98, 0.01]])
    batch = TrainBatch(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]), {"weak": weak.log(), "strong": weak.log()}, torch.tensor([3, 0, 2, 4]))
    out = method.train_step(batch, context())
    # thresholds [0.475, 0.19, 0]: 0.96 >= 0.475 (class 0), 0.85 >= 0.19 (1), 0.44 < 0.475 (0), 0.98 >= 0.19 (1)
    assert out.mask.tolist() == [True, True, False, True]
    assert [out.metrics[f"threshold/class_{c}"].item() for c in range(3)] == pytest.approx([0.475, 0.19, 0.0])
    assert out.metrics["unused_fraction"].item() == 0.5
    # confident (>= 0.95): sample 3 -> class 0, sample 4 -> class 1; sample 0 (0.85) keeps its class 0
    assert method.status.tolist() == [0, 0, 1, 0, 1, -1]
    assert method.status.dtype == torch.int8
    # the next step's thresholds: sigma = [3, 2, 0], unused 1 -> beta = [1, 2/3, 0] -> [0.95, 0.475, 0]
    out = method.train_step(batch, context())
    assert [out.metrics[f"threshold/class_{c}"].item() for c in range(3)] == pytest.approx([0.95, 0.475, 0.0])


def test_distribution_alignment_reads_thresholds_and_statuses_from_the_aligned_weak_view():
    method = flexmatch("method.flexmatch.distribution_alignment=0.5")
    method.status = torch.tensor(STATUS, dtype=torch.int8)
    weak = torch.tensor([[0.96, 0.02, 0.02], [0.1, 0.85, 0.05], [0.44, 0.3, 0.26], [0.01, 0.98, 0.01]])
    labeled = torch.eye(3) * 2  # one label of each class: the labels' average stays uniform
    batch = TrainBatch(labeled, torch.tensor([0, 1, 2]), {"weak": weak.log(), "strong": weak.log()}, torch.tensor([3, 0, 2, 4]))
    out = method.train_step(batch, context())
    # mean prediction [0.3775, 0.5375, 0.085]; its average from uniform with decay 0.5:
    predicted = [0.5 / 3 + 0.5 * m for m in (0.3775, 0.5375, 0.085)]
    assert method.alignment.state_dict()["predicted"] == pytest.approx(predicted)
    # weak x (1/3) / predicted, renormalized: [0.9502, 0.0162, 0.0336], [0.1138, 0.7895, 0.0967],
    # [0.3905, 0.2174, 0.3921] (the third sample now goes to class 2, threshold 0), [0.0121, 0.9674, 0.0206]
    assert out.pseudo_labels.tolist() == [0, 1, 2, 1]
    assert out.mask.tolist() == [True, True, True, True]  # without alignment the third sample is masked out
    # confident (>= 0.95, aligned): sample 3 -> class 0 (0.9502), sample 4 -> class 1 (0.9674)
    assert method.status.tolist() == [0, 0, 1, 0, 1, -1]
    again = flexmatch("method.flexmatch.distribution_alignment=0.5")
    again.load_state_dict(method.state_dict())
    assert again.alignment.state_dict() == method.alignment.state_dict()


def test_a_sample_twice_in_one_batch_keeps_the_higher_class_whatever_the_order():
    for order in ([0, 1], [1, 0]):
        method = flexmatch()
        pseudo = torch.tensor([2, 1])[order]
        method.update(torch.tensor([5, 5]), pseudo, torch.tensor([True, True]), context())
        assert method.status.tolist() == [-1, -1, -1, -1, -1, 2]


def test_status_is_saved_and_a_pool_of_another_size_or_above_the_limit_is_refused():
    method = flexmatch(num_classes=200)
    assert method.status.dtype == torch.int16  # more classes than int8 holds
    method.status[2] = 150
    again = flexmatch(num_classes=200)
    again.load_state_dict(method.state_dict())
    assert torch.equal(again.status, method.status)
    with pytest.raises(UserError, match="covers 6 unlabeled samples, this run's pool has 7"):
        flexmatch(pool_size=7).load_state_dict(method.state_dict())
    with pytest.raises(UserError) as refused:
        flexmatch("method.flexmatch.max_pool_size=5")
    assert str(refused.value) == (
        "method 'flexmatch' keeps a learning status per unlabeled sample, and the pool has 6 samples, above "
        "method.flexmatch.max_pool_size=5: raise it, or use method.name=freematch, whose adaptive thresholds need no per-sample state"
    )
