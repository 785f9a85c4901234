"""SoftMatch's formulas against a hand computation: 4 unlabeled samples, 3 classes, lambda = 0.5."""

import math

import pytest
import torch

from dist_ssl.config import load_config
from dist_ssl.methods import METHODS
from dist_ssl.methods.base import StepContext, TrainBatch
from dist_ssl.methods.softmatch import sample_weights, uniform_aligned
from tests.methods.test_freematch import WEAK, identity_net

# By hand. Uniform alignment: the moving mean probability starts at the first batch's mean,
# m = [0.35, 0.4125, 0.2375]; each row times (1/3) / m = [0.952381, 0.808081, 1.403509], renormalized:
ALIGNED = [
    [0.688255, 0.166850, 0.144896],  # [0.666667, 0.161616, 0.140351] / 0.968634
    [0.107973, 0.732909, 0.159118],  # [0.095238, 0.646465, 0.140351] / 0.882054
    [0.375449, 0.278743, 0.345808],  # [0.380952, 0.282828, 0.350877] / 1.014658
    [0.167872, 0.213655, 0.618474],  # [0.190476, 0.242424, 0.701754] / 1.134655
]
# Confidences x = [0.688255, 0.732909, 0.375449, 0.618474]: mean 0.603771, unbiased variance
# (0.084484^2 + 0.129138^2 + 0.228322^2 + 0.014703^2) / 3 = 0.025387.
# mu = 0.5 / 3 + 0.5 * 0.603771 = 0.468552;  var = 0.5 * 1 + 0.5 * 0.025387 = 0.512694.
MU, VAR = 0.468552, 0.512694
# Only sample 2 is below mu: exp(-(0.375449 - 0.468552)^2 / (2 * 0.512694 / 2^2)) = exp(-0.033815)
WEIGHTS = [1.0, 1.0, 0.966751, 1.0]


def test_weights_are_one_above_the_mean_and_a_gaussian_below():
    confidence = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    got = sample_weights(confidence, torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.04, dtype=torch.float64), 2.0)
    # 0.3 is 0.2 below the mean: exp(-0.2^2 / (2 * 0.04 / 2^2)) = exp(-2)
    assert got.tolist() == pytest.approx([1.0, 1.0, math.exp(-2.0)], rel=1e-12)


def test_uniform_alignment_rescales_by_uniform_over_the_mean_and_renormalizes():
    probs = torch.tensor(WEAK, dtype=torch.float64)
    got = uniform_aligned(probs, probs.mean(dim=0))
    assert got.flatten().tolist() == pytest.approx(sum(ALIGNED, []), abs=2e-6)


def test_a_step_aligns_then_moves_mean_and_variance_then_weighs():
    cfg = load_config(None, ["method.name=softmatch", "method.softmatch.ema_decay=0.5"])
    method = METHODS["softmatch"](cfg, {"model": identity_net()}, 3)
    assert method.class_mean is None and method.mean.item() == pytest.approx(1 / 3) and method.variance.item() == 1.0
    strong = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]])
    batch = TrainBatch(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]), {"weak": torch.tensor(WEAK).log(), "strong": strong.log()}, torch.arange(4))
    out = method.train_step(batch, StepContext(0, 0.0, 10, lambda name, loss: None))

    assert method.class_mean.tolist() == pytest.approx([0.35, 0.4125, 0.2375], rel=1e-6)  # the first batch's mean
    assert method.mean.item() == pytest.approx(MU, abs=2e-6) and method.variance.item() == pytest.approx(VAR, abs=2e-6)
    assert out.pseudo_labels.tolist() == [0, 1, 0, 2]
    assert out.metrics["mask_rate"].item() == pytest.approx(sum(WEIGHTS) / 4, abs=2e-6)
    assert out.metrics["threshold"].item() == pytest.approx(MU, abs=2e-6)
    assert [out.metrics[f"alignment/class_{c}"].item() for c in range(3)] == pytest.approx([0.952381, 0.808081, 1.403509], abs=2e-6)
    # weighted strong-view CE against the aligned argmax
    loss_u = -(math.log(0.6) + math.log(0.7) + WEIGHTS[2] * math.log(0.1) + math.log(0.4)) / 4
    assert out.metrics["loss_unlabeled"].item() == pytest.approx(loss_u, rel=1e-5)

    # a second batch, of uniform predictions, moves m by lambda instead of replacing it
    batch.unlabeled["weak"] = torch.zeros(4, 3)
    method.train_step(batch, StepContext(1, 0.0, 10, lambda name, loss: None))
    assert method.class_mean.tolist() == pytest.approx([(0.35 + 1 / 3) / 2, (0.4125 + 1 / 3) / 2, (0.2375 + 1 / 3) / 2], rel=1e-6)
    again = METHODS["softmatch"](cfg, {"model": identity_net()}, 3)
    again.load_state_dict(method.state_dict())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in method.state_dict().items())
