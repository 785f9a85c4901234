"""FreeMatch's formulas against a hand computation: 4 unlabeled samples, 3 classes, lambda = 0.5 so
that one step moves the averages visibly."""

import math

import pytest
import torch
from torch import nn

from dist_ssl.config import load_config
from dist_ssl.methods import METHODS
from dist_ssl.methods.base import StepContext, TrainBatch
from dist_ssl.methods.freematch import class_thresholds, fairness_loss

WEAK = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.4, 0.35, 0.25], [0.2, 0.3, 0.5]]  # argmax 0, 1, 0, 2
STRONG = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]]  # argmax 0, 1, 2, 0

# By hand, from tau = p~ = h~ = 1/3:
#   mean max confidence (0.7 + 0.8 + 0.4 + 0.5) / 4 = 0.6        -> tau = 1/6 + 0.3 = 7/15
#   mean probability [0.35, 0.4125, 0.2375]                      -> p~ = [41/120, 179/480, 137/480]
#   histogram of the argmax [2, 1, 1] / 4                        -> h~ = [5/12, 7/24, 7/24]
TAU = 7 / 15
P_MODEL = [41 / 120, 179 / 480, 137 / 480]
HISTOGRAM = [5 / 12, 7 / 24, 7 / 24]
# tau(c) = tau * p~(c) / max p~ = 7/15 * [164/179, 1, 137/179]
CLASS_THRESHOLDS = [7 / 15 * 164 / 179, 7 / 15, 7 / 15 * 137 / 179]  # [0.4276, 0.4667, 0.3572]
MASK = [True, True, False, True]  # 0.7 >= 0.4276, 0.8 >= 0.4667, 0.4 < 0.4276, 0.5 >= 0.3572
# Fairness over the masked samples 0, 1, 3: strong softmax summed [1.3, 1.1, 0.6], argmax counts [2, 1, 0]:
#   batch side  sum q / counts = [0.65, 1.1, 0 (no sample)]  / 1.75
#   model side  p~ / h~        = [0.82, 179/140, 137/140]      / (0.82 + 316/140)
BATCH_SIDE = [0.65 / 1.75, 1.1 / 1.75, 0.0]
MODEL_SIDE = [v / (0.82 + 316 / 140) for v in (0.82, 179 / 140, 137 / 140)]
FAIRNESS = sum(m * math.log(b + 1e-12) for m, b in zip(MODEL_SIDE, BATCH_SIDE))  # -9.2439: -H, USB's sign


def identity_net():
    """Logits = inputs: the batch's inputs are the log-probabilities the test chose."""
    net = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(3))
    return net


def steps(recorded):
    return StepContext(0, 0.0, 10, lambda name, loss: recorded.append((name, loss)))


def test_class_thresholds_are_the_global_threshold_times_maxnorm():
    got = class_thresholds(torch.tensor(TAU, dtype=torch.float64), torch.tensor(P_MODEL, dtype=torch.float64))
    assert got.tolist() == pytest.approx(CLASS_THRESHOLDS, rel=1e-12)


def test_fairness_loss_matches_the_hand_computation_and_is_zero_without_masked_samples():
    masked_sum = torch.tensor([1.3, 1.1, 0.6], dtype=torch.float64)
    counts = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    p_model, histogram = torch.tensor(P_MODEL, dtype=torch.float64), torch.tensor(HISTOGRAM, dtype=torch.float64)
    assert fairness_loss(masked_sum, counts, p_model, histogram).item() == pytest.approx(FAIRNESS, rel=1e-9)
    assert FAIRNESS == pytest.approx(-9.2439, abs=1e-4)
    nothing = fairness_loss(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), p_model, histogram)
    assert nothing.item() == 0.0


def test_a_step_moves_the_statistics_before_masking_and_trains_on_the_hand_mask():
    cfg = load_config(None, ["method.name=freematch", "method.freematch.ema_decay=0.5"])
    method = METHODS["freematch"](cfg, {"model": identity_net()}, 3)
    weak, strong = torch.tensor(WEAK).log(), torch.tensor(STRONG).log()
    batch = TrainBatch(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]), {"weak": weak, "strong": strong}, torch.arange(4))
    recorded = []
    out = method.train_step(batch, steps(recorded))

    assert method.threshold.item() == pytest.approx(TAU, rel=1e-6)
    assert method.class_distribution.tolist() == pytest.approx(P_MODEL, rel=1e-6)
    assert method.histogram.tolist() == pytest.approx(HISTOGRAM, rel=1e-12)
    assert out.mask.tolist() == MASK and out.pseudo_labels.tolist() == [0, 1, 0, 2]
    assert out.metrics["threshold"].item() == pytest.approx(TAU, rel=1e-6)
    assert [out.metrics[f"threshold/class_{c}"].item() for c in range(3)] == pytest.approx(CLASS_THRESHOLDS, rel=1e-6)
    assert out.metrics["mask_rate"].item() == 0.75
    assert out.metrics["loss_fairness"].item() == pytest.approx(FAIRNESS, rel=1e-5)
    # strong-view CE of the masked samples' weak argmax, averaged over all 4 (USB's masked mean)
    loss_u = -(math.log(0.6) + math.log(0.7) + math.log(0.4)) / 4
    loss_l = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert out.metrics["loss_unlabeled"].item() == pytest.approx(loss_u, rel=1e-5)
    assert out.metrics["loss"].item() == pytest.approx(loss_l + loss_u + 0.01 * FAIRNESS, rel=1e-5)
    assert [name for name, _ in recorded] == ["model"]


def test_statistics_start_at_one_over_c_and_survive_a_checkpoint():
    cfg = load_config(None, ["method.name=freematch"])
    method = METHODS["freematch"](cfg, {"model": identity_net()}, 4)
    assert method.threshold.item() == 0.25 and method.class_distribution.tolist() == [0.25] * 4 == method.histogram.tolist()
    method.update(torch.softmax(torch.randn(6, 4), dim=1), steps([]))
    again = METHODS["freematch"](cfg, {"model": identity_net()}, 4)
    again.load_state_dict(method.state_dict())
    for key, value in method.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
