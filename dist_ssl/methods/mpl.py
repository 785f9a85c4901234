"""Meta Pseudo Labels (Pham et al. 2021): a teacher learns to pseudo-label from how much its labels
help the student.

One step (after the student's `roles.student.wait_steps`, during which only the teacher trains):

1. The teacher sees [labeled, weak, strong]. Its own loss is label-smoothed CE on the labels plus
   UDA: CE between its weak-view softmax sharpened by `temperature` (kept where the confidence
   reaches `threshold`) and its strong-view prediction, weighted by lambda_u ramped over `uda_steps`.
2. It pseudo-labels the strong view (`pseudo_labels`: hard argmax, a sampled class, or its softmax;
   `pseudo_label_view` may pick the weak view instead). With `distribution_alignment` its softmax is
   aligned to the labels' class balance (methods/alignment.py) before labels and UDA targets are
   read from it; the feedback term reinforces the aligned label.
3. The student's labeled loss is measured (L_old), the student takes one optimizer step on
   label-smoothed CE of its strong-view prediction against the pseudo-labels, and the labeled loss
   is measured again (L_new).
4. Feedback h = L_old - L_new (> 0: the pseudo-labels helped), averaged over the global labeled batch
   (every rank sums, then all ranks reduce), minus an optional moving-average baseline. The teacher
   steps on its loss + h * CE(teacher on strong, pseudo-labels).

Why this sign: the teacher minimizes the student's labeled loss after the student's step,
J(teacher) = E_{y~teacher}[L(student stepped on y)], y a pseudo-label per unlabeled sample. By the
score-function identity (with L_old as baseline; no Taylor expansion) its gradient is exactly
E[(L_old - L_new(y)) * grad sum_i CE(teacher(x_i), y_i)], so descending h * CE raises the
probability of labels that helped. Under `sampled` the teacher's term, h * mean_i CE, is therefore
an unbiased estimate of grad J divided by the global unlabeled batch size (the batch mean of CE is
what both references use; `feedback_weight` = that batch size restores the exact scale); `hard` uses the
mode instead of a sample (kekmodel). `tests/methods/test_mpl_math.py` checks this against finite
differences of J. Both reference codes (google-research, kekmodel) use L_new - L_old: the opposite
sign, which their results could survive because the official soft-label variant gets no feedback
gradient at all (below) and UDA dominates.

Known differences with the reference implementations, all deliberate:

* sign of the feedback (above);
* the feedback is averaged over all ranks (official: a cross-replica sum; kekmodel: per rank, so
  its results depend on the GPU count);
* L_old and L_new are both measured on the labeled batch alone, with dropout off and batch norm on
  batch statistics without updating its running averages (`measuring`), so h is the effect of the
  step alone. kekmodel took L_old from the student's forward over [labeled, strong] in train mode
  and L_new from labeled alone: for a batch-norm net the two differ in batch statistics too;
* the moving baseline (`baseline_decay`, official 0.99) starts at 0 (official: a random number) and
  is the average of earlier steps' feedback, so subtracting it keeps the gradient unbiased;
* the pseudo-label of the student's step and of the teacher's feedback term is the same one, and
  the feedback term reinforces the teacher's prediction on the view that produced it (kekmodel
  trains the student on the weak view's argmax but reinforces the strong view's argmax);
* `soft`: the student learns the teacher's softmax (official code). The official feedback term
  CE(teacher, stop_gradient(softmax(teacher))) has a zero gradient (google-research #534, kekmodel #2):
  a scalar cannot say which classes helped. We do not compute a term that is always zero; under
  `soft` the teacher learns from labels and UDA, and the feedback is logged only;
* student waits: it neither trains nor is measured; its schedule starts after the wait (kekmodel
  kept stepping it at learning rate 0, which also fed its momentum).

The student's EMA (`train.ema_decay`) is what gets evaluated; `train.finetune` fine-tunes it on the
labels at the end.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from dist_ssl.config import Config, MPLConfig, role_wait_steps
from dist_ssl.methods.alignment import Alignment, aligned
from dist_ssl.methods.base import Method, StepContext, StepOutput, TrainBatch, full


def uda_weight(step: int, cfg: MPLConfig) -> float:
    return cfg.uda_weight * min(1.0, (step + 1) / cfg.uda_steps)


def uda_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor, cfg: MPLConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """UDA consistency: CE of the strong view against the sharpened, confident weak-view softmax."""
    targets = torch.softmax(full(logits_weak.detach()) / cfg.temperature, dim=1)
    mask = targets.max(dim=1).values >= cfg.threshold
    per_sample = -(targets * torch.log_softmax(full(logits_strong), dim=1)).sum(dim=1)
    return (per_sample * mask).mean(), mask


def pseudo_labels(logits: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(class per sample, what the student learns: those classes, or the softmax under `soft`)."""
    probs = torch.softmax(full(logits.detach()), dim=1)
    if mode == "sampled":  # the rank's torch generator: seeded per rank and saved in checkpoints
        labels = torch.multinomial(probs, 1).squeeze(1)
    else:
        labels = probs.argmax(dim=1)
    return labels, probs if mode == "soft" else labels


@contextmanager
def measuring(net: nn.Module):
    """Forward passes that measure rather than train: dropout off, batch norm on the batch's own
    statistics (as in training) but without moving its running averages."""
    saved = []
    for module in net.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training:
            saved.append((module, "training", True))
            module.eval()
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            saved.append((module, "momentum", module.momentum))
            saved.append((module, "num_batches_tracked", module.num_batches_tracked.clone()))
            module.momentum = 0.0  # running <- 1 * running + 0 * batch
    try:
        yield
    finally:
        for module, name, value in saved:
            if name == "training":
                module.train()
            elif name == "num_batches_tracked":
                module.num_batches_tracked.copy_(value)
            else:
                module.momentum = value


@torch.no_grad()
def labeled_loss_sum(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with measuring(net):
        return F.cross_entropy(full(net(x)), y, reduction="sum").double()


class Feedback:
    """h = L_old - L_new of the global labeled batch, minus a moving baseline of earlier steps."""

    def __init__(self, decay: float):
        self.decay = decay
        self.baseline = 0.0

    def __call__(self, before: torch.Tensor, after: torch.Tensor, count: int, ctx: StepContext) -> tuple[float, float, float]:
        """(feedback, change, new labeled loss), identical on every rank."""
        sums = ctx.reduce_sum(torch.stack([before, after, torch.tensor(float(count), dtype=torch.float64, device=before.device)]))
        old, new = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
        change = old - new
        if self.decay == 0:
            return change, change, new
        feedback = change - self.baseline
        self.baseline = self.decay * self.baseline + (1 - self.decay) * change
        return feedback, change, new


class MPL(Method):
    roles = ("teacher", "student")
    eval_role = "student"
    unlabeled_views = ("weak", "strong")

    def __init__(self, cfg: Config, nets: dict[str, nn.Module], num_classes: int, pool_size: int = 0):
        super().__init__(cfg, nets, num_classes, pool_size)
        self.settings = cfg.method.mpl
        self.feedback = Feedback(self.settings.baseline_decay)
        self.alignment = Alignment(self.settings.distribution_alignment, num_classes)

    def train_step(self, batch: TrainBatch, ctx: StepContext) -> StepOutput:
        cfg = self.settings
        teacher, student = self.nets["teacher"], self.nets["student"]
        x_l, y = batch.labeled_x, batch.labeled_y
        weak, strong = batch.unlabeled["weak"], batch.unlabeled["strong"]
        n_l, n_u = len(x_l), len(weak)

        t_labeled, t_weak, t_strong = teacher(torch.cat([x_l, weak, strong])).split([n_l, n_u, n_u])
        loss_labeled = F.cross_entropy(t_labeled, y, label_smoothing=cfg.label_smoothing)
        t_view = t_strong if cfg.pseudo_label_view == "strong" else t_weak
        shift = self.alignment(t_view, y, ctx)
        loss_uda, mask = uda_loss(aligned(t_weak, shift), t_strong, cfg)
        weight = uda_weight(ctx.step, cfg)
        teacher_loss = loss_labeled + weight * loss_uda
        labels, targets = pseudo_labels(aligned(t_view, shift), cfg.pseudo_labels)
        metrics = {"loss_labeled": loss_labeled.detach(), "loss_unlabeled": loss_uda.detach(), "uda_weight": weight, "mask_rate": mask.float().mean()}

        if ctx.step >= role_wait_steps(self.cfg, "student"):
            before = labeled_loss_sum(student, x_l, y)
            s_strong = student(torch.cat([x_l, strong]))[n_l:]  # batch norm sees both, as in both references
            student_loss = F.cross_entropy(full(s_strong), targets, label_smoothing=cfg.label_smoothing)
            ctx.optimize("student", student_loss)
            after = labeled_loss_sum(student, x_l, y)
            feedback, change, student_labeled = self.feedback(before, after, n_l, ctx)
            if cfg.pseudo_labels != "soft":
                teacher_loss = teacher_loss + cfg.feedback_weight * feedback * F.cross_entropy(full(t_view), labels)
            metrics.update(loss_student=student_loss.detach(), student_loss_labeled=student_labeled, feedback=change, feedback_baseline=self.feedback.baseline)
        ctx.optimize("teacher", teacher_loss)
        metrics["loss"] = teacher_loss.detach()
        return StepOutput(metrics, pseudo_labels=labels, mask=torch.ones_like(labels, dtype=torch.bool))

    def state_dict(self) -> dict:
        return {"baseline": self.feedback.baseline, "alignment": self.alignment.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.feedback.baseline = float(state["baseline"])
        if "alignment" in state:  # checkpoints from before distribution alignment: it was off
            self.alignment.load_state_dict(state["alignment"])
