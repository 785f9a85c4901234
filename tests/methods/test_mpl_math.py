"""MPL's and SMPL's updates against what finite differences of the student's labeled loss say.

Tiny float64 MLPs on a 3-class problem, stepped by the engine's own `Stepper` and optimizers (plain
SGD, so an update is -lr * gradient and can be read off the weights).
"""

import copy
import itertools

import pytest
import torch
from torch.nn import functional as F

from dist_ssl.config import ModelConfig, load_config
from dist_ssl.engine.accelerator import make_accelerator
from dist_ssl.engine.optim import Stepper, build_optimizer, build_scheduler
from dist_ssl.methods import METHODS
from dist_ssl.methods.base import StepContext, TrainBatch
from dist_ssl.methods.mpl import Feedback, measuring
from dist_ssl.models import build_model

CLASSES = 3
STUDENT_LR = 0.5
SMOOTHING = 0.15


def mlp(seed):
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="mlp", hidden_sizes=[5]), CLASSES, (2,)).double()


def problem():
    generator = torch.Generator().manual_seed(7)
    x_l = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x_u = torch.randn(2, 2, generator=generator, dtype=torch.float64)
    return TrainBatch(x_l, y, {"weak": x_u, "strong": x_u})


def mpl_config(*extra):
    return load_config(None, [
        "method.name=mpl", f"method.mpl.label_smoothing={SMOOTHING}", "method.mpl.uda_weight=0", "optim.schedule=constant",
        "optim.momentum=0", "optim.weight_decay=0", f"roles.student.lr={STUDENT_LR}", "roles.teacher.lr=1.0", *extra,
    ])


def one_step(method_name, cfg, nets, batch, step=0):
    """One training step through the engine's Stepper; returns the step's output."""
    method_cls = METHODS[method_name]
    specs = method_cls.optimizer_specs(cfg)
    optimizers = {name: build_optimizer(nets[spec.net], spec.optim) for name, spec in specs.items()}
    schedulers = {name: build_scheduler(optimizers[name], 100, spec.optim) for name, spec in specs.items()}
    stepper = Stepper(make_accelerator(), nets, specs, optimizers, schedulers)
    stepper.step = step
    method = method_cls(cfg, nets, CLASSES)
    return method.train_step(batch, StepContext(step, 0.0, 100, stepper, stepper.reduce_sum))


def flat(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def labeled_loss(net, batch):
    return F.cross_entropy(net(batch.labeled_x), batch.labeled_y)


def teacher_supervised_grad(teacher, batch):
    loss = F.cross_entropy(teacher(batch.labeled_x), batch.labeled_y, label_smoothing=SMOOTHING)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(teacher.parameters()))])


def stepped_on(net, x_u, labels, lr=STUDENT_LR):
    """A copy of `net` after one plain SGD step on label-smoothed CE against `labels`."""
    stepped = copy.deepcopy(net)
    loss = F.cross_entropy(stepped(x_u), labels, label_smoothing=SMOOTHING)
    grads = torch.autograd.grad(loss, list(stepped.parameters()))
    with torch.no_grad():
        for p, g in zip(stepped.parameters(), grads):
            p -= lr * g
    return stepped


def uda(net, x_u, temperature):
    """UDA with threshold 0 and weak view = strong view (vectors have no augmentation)."""
    logits = net(x_u)
    targets = torch.softmax(logits.detach() / temperature, dim=1)
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def expected_loss_after_student_step(teacher, student, batch):
    """J(teacher) = E_{y ~ teacher}[student's labeled loss after its step on y], by enumeration."""
    x_u = batch.unlabeled["strong"]
    probs = torch.softmax(teacher(x_u), dim=1)
    total = 0.0
    for labels in itertools.product(range(CLASSES), repeat=len(x_u)):
        labels = torch.tensor(labels)
        chance = probs[torch.arange(len(x_u)), labels].prod()
        total = total + chance.detach() * labeled_loss(stepped_on(student, x_u, labels), batch).detach()
    return total


def finite_difference_grad(fn, net, eps=1e-6):
    grads = []
    for p in net.parameters():
        for i in range(p.numel()):
            values = []
            for shift in (eps, -2 * eps, eps):
                with torch.no_grad():
                    p.view(-1)[i] += shift
                values.append(float(fn()))
            grads.append((values[0] - values[1]) / (2 * eps))
    return torch.tensor(grads, dtype=torch.float64)


def test_sampled_feedback_is_the_gradient_of_the_students_expected_labeled_loss():
    """Averaged over the teacher's sampled pseudo-labels, the teacher's feedback gradient equals the
    finite-difference gradient of J: same direction, same size. Its scale is the unlabeled batch
    size times that of the references' batch-mean term (feedback_weight = 1)."""
    batch = problem()
    teacher, student = mlp(1), mlp(2)
    n_unlabeled = len(batch.unlabeled["strong"])
    cfg = mpl_config("method.mpl.pseudo_labels=sampled", f"method.mpl.feedback_weight={n_unlabeled}")
    supervised = teacher_supervised_grad(teacher, batch)
    by_labels = {}
    for seed in range(400):
        nets = {"teacher": copy.deepcopy(teacher), "student": copy.deepcopy(student)}
        torch.manual_seed(seed)
        out = one_step("mpl", cfg, nets, batch)
        update = flat(teacher) - flat(nets["teacher"])  # = 1.0 * gradient of the teacher's loss
        by_labels.setdefault(tuple(out.pseudo_labels.tolist()), update - supervised)
        if len(by_labels) == CLASSES ** 2:
            break
    assert len(by_labels) == CLASSES ** 2, "not every pseudo-labeling was drawn"
    probs = torch.softmax(teacher(batch.unlabeled["strong"]), dim=1).detach()
    expected = sum(probs[0, a] * probs[1, b] * grad for (a, b), grad in by_labels.items())
    predicted = finite_difference_grad(lambda: expected_loss_after_student_step(teacher, student, batch), teacher)
    assert predicted.norm() > 1e-3  # the pseudo-labels matter to the student on this problem
    assert torch.allclose(expected, predicted, rtol=1e-5, atol=1e-8), (expected, predicted)


def test_hard_feedback_matches_the_papers_first_order_formula():
    """h = L_old - L_new agrees in sign and size with MPL's dot product lr * grad L(after) . grad CE(before)."""
    batch = problem()
    teacher, student = mlp(1), mlp(2)
    lr = 1e-4  # the formula is first order in the student's step
    cfg = mpl_config("method.mpl.pseudo_labels=hard", f"roles.student.lr={lr}")
    nets = {"teacher": copy.deepcopy(teacher), "student": copy.deepcopy(student)}
    out = one_step("mpl", cfg, nets, batch)
    labels = out.pseudo_labels
    x_u = batch.unlabeled["strong"]
    pseudo_loss = F.cross_entropy(student(x_u), labels, label_smoothing=SMOOTHING)
    g_pseudo = torch.autograd.grad(pseudo_loss, list(student.parameters()))
    g_labeled = torch.autograd.grad(labeled_loss(nets["student"], batch), list(nets["student"].parameters()))
    dot_product = lr * sum((a * b).sum() for a, b in zip(g_labeled, g_pseudo))
    h = out.metrics["feedback"]
    assert abs(float(dot_product)) > 1e-8
    assert h == pytest.approx(float(dot_product), rel=1e-2)
    # ... and the teacher's update is h times the gradient of its CE on those pseudo-labels.
    ce = F.cross_entropy(teacher(x_u), labels)
    g_ce = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ce, list(teacher.parameters()))])
    update = flat(teacher) - flat(nets["teacher"])
    assert torch.allclose(update - teacher_supervised_grad(teacher, batch), h * g_ce, rtol=1e-9, atol=1e-12)


def test_smpl_is_a_plain_pseudo_label_step_then_the_feedback_step_at_the_new_weights():
    batch = problem()
    net = mlp(3)
    lr = 0.2
    cfg = load_config(None, [
        "method.name=smpl", f"method.smpl.label_smoothing={SMOOTHING}", "method.smpl.uda_weight=2", "method.smpl.uda_steps=1",
        "method.smpl.threshold=0", "method.smpl.baseline_decay=0", "optim.schedule=constant", "optim.momentum=0", "optim.weight_decay=0",
        f"optim.lr={lr}",
    ])
    stepped = {"model": copy.deepcopy(net)}
    out = one_step("smpl", cfg, stepped, batch)
    x_u, labels = batch.unlabeled["strong"], out.pseudo_labels
    assert torch.equal(labels, net(x_u).argmax(dim=1))
    after_pseudo = stepped_on(net, x_u, labels, lr)
    h = float((labeled_loss(net, batch) - labeled_loss(after_pseudo, batch)).detach())
    assert out.metrics["feedback"] == pytest.approx(h, rel=1e-9)
    loss = (F.cross_entropy(after_pseudo(batch.labeled_x), batch.labeled_y, label_smoothing=SMOOTHING)
            + 2 * uda(after_pseudo, x_u, cfg.method.smpl.temperature) + h * F.cross_entropy(after_pseudo(x_u), labels))
    grads = torch.autograd.grad(loss, list(after_pseudo.parameters()))
    expected = torch.cat([(p - lr * g).detach().reshape(-1) for p, g in zip(after_pseudo.parameters(), grads)])
    assert torch.allclose(flat(stepped["model"]), expected, rtol=1e-9, atol=1e-12)


def test_moving_baseline_subtracts_the_average_of_earlier_feedback():
    feedback = Feedback(decay=0.9)
    ctx = StepContext(0, 0.0, 1, optimize=None)
    changes = []
    for before, after in [(3.0, 2.0), (2.0, 1.5), (1.5, 1.6)]:
        value, change, _ = feedback(torch.tensor(before, dtype=torch.float64), torch.tensor(after, dtype=torch.float64), 1, ctx)
        changes.append(change)
        baseline_before = 0.0 if len(changes) == 1 else 0.1 * changes[0] if len(changes) == 2 else 0.9 * 0.1 * changes[0] + 0.1 * changes[1]
        assert value == pytest.approx(change - baseline_before)
    assert changes == pytest.approx([1.0, 0.5, -0.1])


def test_measuring_keeps_batch_norm_running_statistics_and_switches_dropout_off():
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="small_cnn", dropout=0.5), 10, (1, 8, 8))
    net.train()
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad(), measuring(net):
        first, second = net(x), net(x)
    assert torch.equal(first, second)  # no dropout noise
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(m.training for m in net.modules())
    with torch.no_grad():
        net(x)
    assert not torch.equal(net.state_dict()["bn1.running_mean"], before["bn1.running_mean"])  # training still updates them
