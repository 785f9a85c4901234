import pytest
import torch
from torch import nn

from dist_ssl.config import load_config
from dist_ssl.errors import UserError
from dist_ssl.methods import METHODS, get_method
from dist_ssl.methods.base import StepContext, TrainBatch
from dist_ssl.methods.pseudo_label import alpha


def test_alpha_ramp_follows_lee_2013():
    assert alpha(50, 3.0, 100, 600) == 0.0
    assert alpha(100, 3.0, 100, 600) == 0.0
    assert alpha(350, 3.0, 100, 600) == pytest.approx(1.5)
    assert alpha(600, 3.0, 100, 600) == 3.0
    assert alpha(10_000, 3.0, 100, 600) == 3.0


def test_unknown_method_names_the_closest():
    with pytest.raises(UserError, match="unknown method 'fixmach' \\(did you mean 'fixmatch'\\?\\)"):
        get_method("fixmach")


class Recorder:
    """Stands in for the engine's optimize(): records what a method asked to step."""

    def __init__(self):
        self.calls = []

    def __call__(self, role, loss):
        assert loss.requires_grad and loss.ndim == 0
        loss.backward()
        self.calls.append(role)


def batch(n_l=4, n_u=8, views=("weak", "strong")):
    torch.manual_seed(0)
    return TrainBatch(torch.randn(n_l, 1, 8, 8), torch.arange(n_l) % 3, {v: torch.randn(n_u, 1, 8, 8) for v in views}, torch.arange(n_u))


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_steps_each_optimizer_once(name):
    cfg = load_config(None, [f"method.name={name}", "method.pseudo_label.ramp_start_epoch=0", "method.pseudo_label.ramp_end_epoch=1"])
    method_cls = METHODS[name]
    method = method_cls(cfg, {role: net() for role in method_cls.roles}, 3, pool_size=8)
    recorder = Recorder()
    out = method.train_step(batch(views=method_cls.unlabeled_views), StepContext(3, 0.5, 10, recorder))
    assert sorted(recorder.calls) == sorted(method_cls.optimizer_specs(cfg))
    assert torch.isfinite(torch.as_tensor(out.metrics["loss"]))


def run_fixmatch(threshold):
    cfg = load_config(None, [f"method.fixmatch.threshold={threshold}"])
    method = METHODS["fixmatch"](cfg, {"model": net()}, 3)
    return method.train_step(batch(), StepContext(0, 0.0, 10, Recorder()))


def test_fixmatch_threshold_masks_pseudo_labels():
    everything = run_fixmatch(0.0)
    assert bool(everything.mask.all()) and float(everything.metrics["mask_rate"]) == 1.0
    nothing = run_fixmatch(1.0)  # a softmax of a random linear net is never exactly 1
    assert not bool(nothing.mask.any()) and float(nothing.metrics["loss_unlabeled"]) == 0.0
    assert everything.pseudo_labels.shape == (8,)


def test_pseudo_label_skips_the_unlabeled_pass_before_t1():
    cfg = load_config(None, ["method.pseudo_label.ramp_start_epoch=5"])
    method = METHODS["pseudo_label"](cfg, {"model": net()}, 3)
    out = method.train_step(batch(views=("weak",)), StepContext(0, 1.0, 10, Recorder()))
    assert out.metrics["alpha"] == 0.0 and out.pseudo_labels is None


def test_distribution_alignment_rescales_pseudo_labels_to_the_labels_class_balance():
    from dist_ssl.methods.alignment import Alignment, aligned

    ctx = StepContext(0, 0.0, 10, Recorder())
    assert Alignment(0.0, 2)(torch.zeros(4, 2), torch.tensor([0, 1]), ctx) is None  # off: targets untouched
    assert aligned(torch.ones(2, 2), None).equal(torch.ones(2, 2))
    # a labeler that calls most of the pool class 0 (mean prediction [0.74, 0.26]); balanced labels
    probs = torch.tensor([[0.9, 0.1]] * 6 + [[0.6, 0.4]] * 2 + [[0.2, 0.8]] * 2)
    labels = torch.tensor([0, 1, 1, 0])
    alignment = Alignment(0.5, 2)
    first = aligned(probs.log(), alignment(probs.log(), labels, ctx)).softmax(1)
    assert torch.allclose(first.sum(1), torch.ones(10))
    for _ in range(40):
        shift = alignment(probs.log(), labels, ctx)
    mean = probs.mean(0)
    expected = probs * (0.5 / mean)
    expected = expected / expected.sum(1, keepdim=True)
    assert torch.allclose(aligned(probs.log(), shift).softmax(1), expected, atol=1e-5)
    # the uncertain 0.6 / 0.4 points now go to the minority class; the confident ones stay
    assert aligned(probs.log(), shift).argmax(1).tolist() == [0] * 6 + [1] * 4
    # the first step is only half-way there (the averages start uniform)
    assert first[6, 0] > expected[6, 0]
    soft = Alignment(0.5, 2)  # soft labels (a split of soft pseudo-labels) count as their probabilities
    soft(probs.log(), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.25, 0.75], [0.75, 0.25]]), ctx)
    assert soft.state_dict()["labeled"] == [0.5, 0.5]
    restored = Alignment(0.5, 2)
    restored.load_state_dict(alignment.state_dict())
    assert restored.state_dict() == alignment.state_dict()


@pytest.mark.parametrize("name", ["fixmatch", "flexmatch", "freematch", "softmatch"])
def test_the_split_forward_takes_the_concatenated_step_without_the_weak_views_backward(name):
    """`method.concat_forward=false`: the weak view is a pass of its own without gradients. On a
    network without batch norm that is the same step as the one concatenated pass: the same losses
    and gradients."""
    grads = {}
    for concat in (True, False):
        cfg = load_config(None, [f"method.name={name}", f"method.concat_forward={str(concat).lower()}", "method.fixmatch.threshold=0.3",
                                 "method.flexmatch.threshold=0.3"])
        model = net()
        out = METHODS[name](cfg, {"model": model}, 3, pool_size=8).train_step(batch(), StepContext(0, 0.0, 10, Recorder()))
        assert float(out.metrics["loss_unlabeled"]) > 0  # the weak view's pseudo-labels reached the loss
        grads[concat] = (float(out.metrics["loss"]), [p.grad.clone() for p in model.parameters()])
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    for together, apart in zip(grads[True][1], grads[False][1]):
        assert torch.allclose(together, apart, atol=1e-7)


def test_the_split_forward_normalizes_the_weak_view_by_its_own_batch():
    from dist_ssl.methods.base import weak_strong_forward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    data = batch()
    _, weak_logits, strong_logits = weak_strong_forward(model, data, concat=False)
    assert not weak_logits.requires_grad and strong_logits.requires_grad
    assert torch.allclose(weak_logits, model(data.unlabeled["weak"]))  # train mode: the weak batch's statistics
    _, together, _ = weak_strong_forward(model, data, concat=True)
    assert not torch.allclose(together, weak_logits)  # with the concatenated batch's, another normalization
