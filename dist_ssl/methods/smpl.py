"""Self Meta Pseudo Labels (Ng & Wang 2022, seed 002): one network is its own teacher.

One step, with MPL's losses (`method.smpl.*` has MPL's keys; the moving baseline is on by default):

1. The network sees [labeled, weak, strong] and pseudo-labels its weak view (`pseudo_label_view`;
   the replication's step 1 learned the strong view from the weak view's argmax, as FixMatch does),
   after distribution alignment when `distribution_alignment` > 0 (the UDA targets of step 4 too).
2. The labeled loss is measured (L_old); the network takes a plain SGD step, p -= lr * grad, on
   label-smoothed CE of the strong view against those pseudo-labels: the `pseudo_step` optimizer
   (no momentum, no weight decay, the main learning rate on its own schedule without warm-up, as in
   the replication). The labeled loss is measured again (L_new).
3. Feedback h = L_old - L_new over the global labeled batch, minus the moving baseline of earlier
   steps (MPL's sign and reasons: `methods/mpl.py`).
4. A second forward pass, at the stepped weights, gives the main step's loss: label-smoothed CE on
   the labels + lambda_u * UDA + h * CE(the labeled view, the step-1 pseudo-labels); the `model`
   optimizer steps on it (momentum, weight decay, warm-up, and `optim.grad_clip`: 0.8 in the
   replication).

Differences with the replication (max-ng/megaboost). Its feedback term reinforced the strong view's
argmax, not the weak-view label step 1 used; here it is the same label, on the view that produced
it (MPL's reasons). It back-propagates step 2 through step 1's
forward graph (kept with retain_graph), i.e. takes the second gradient at the weights before step
1. Under DDP a second backward through one forward is not averaged over ranks (measured: each rank
keeps its own gradient and the replicas drift apart), so step 2 runs its own forward at the stepped
weights: both arrows of the paper's figure start where the previous one ended. Memory stays one
network, one set of gradients and one forward graph at a time (MPL holds the teacher's graph while
the student trains), which is SMPL's point; `benchmarks/mpl_memory.py` measures it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from dist_ssl.config import Config, role_optim
from dist_ssl.methods.alignment import Alignment, aligned
from dist_ssl.methods.base import Method, OptimizerSpec, StepContext, StepOutput, TrainBatch, full
from dist_ssl.methods.mpl import Feedback, labeled_loss_sum, pseudo_labels, uda_loss, uda_weight


class SMPL(Method):
    roles = ("model",)
    unlabeled_views = ("weak", "strong")

    @classmethod
    def optimizer_specs(cls, cfg: Config) -> dict[str, OptimizerSpec]:
        main = role_optim(cfg, "model")
        plain = dataclasses.replace(main, name="sgd", momentum=0.0, nesterov=False, weight_decay=0.0, warmup_steps=0, grad_clip=0.0)
        return {"pseudo_step": OptimizerSpec("model", plain), "model": OptimizerSpec("model", main)}

    def __init__(self, cfg: Config, nets: dict[str, nn.Module], num_classes: int, pool_size: int = 0):
        super().__init__(cfg, nets, num_classes, pool_size)
        self.settings = cfg.method.smpl
        self.feedback = Feedback(self.settings.baseline_decay)
        self.alignment = Alignment(self.settings.distribution_alignment, num_classes)

    def train_step(self, batch: TrainBatch, ctx: StepContext) -> StepOutput:
        cfg = self.settings
        net = self.nets["model"]
        x_l, y = batch.labeled_x, batch.labeled_y
        inputs = torch.cat([x_l, batch.unlabeled["weak"], batch.unlabeled["strong"]])
        sizes = [len(x_l), len(batch.unlabeled["weak"]), len(batch.unlabeled["strong"])]

        _, weak, strong = net(inputs).split(sizes)
        labeler = strong if cfg.pseudo_label_view == "strong" else weak
        shift = self.alignment(labeler, y, ctx)
        labels, targets = pseudo_labels(aligned(labeler, shift), cfg.pseudo_labels)
        pseudo_loss = F.cross_entropy(full(strong), targets, label_smoothing=cfg.label_smoothing)
        before = labeled_loss_sum(net, x_l, y)
        ctx.optimize("pseudo_step", pseudo_loss)
        after = labeled_loss_sum(net, x_l, y)
        feedback, change, labeled_after = self.feedback(before, after, len(x_l), ctx)

        labeled, weak, strong = net(inputs).split(sizes)
        loss_labeled = F.cross_entropy(labeled, y, label_smoothing=cfg.label_smoothing)
        loss_uda, mask = uda_loss(aligned(weak, shift), strong, cfg)
        weight = uda_weight(ctx.step, cfg)
        loss = loss_labeled + weight * loss_uda
        if cfg.pseudo_labels != "soft":  # a scalar feedback gives soft targets no gradient (methods/mpl.py)
            view = strong if cfg.pseudo_label_view == "strong" else weak
            loss = loss + cfg.feedback_weight * feedback * F.cross_entropy(full(view), labels)
        ctx.optimize("model", loss)
        metrics = {
            "loss": loss.detach(),
            "loss_pseudo_step": pseudo_loss.detach(),
            "loss_labeled": loss_labeled.detach(),
            "loss_unlabeled": loss_uda.detach(),
            "loss_labeled_after_pseudo_step": labeled_after,
            "feedback": change,
            "feedback_baseline": self.feedback.baseline,
            "uda_weight": weight,
            "mask_rate": mask.float().mean(),
        }
        return StepOutput(metrics, pseudo_labels=labels, mask=torch.ones_like(labels, dtype=torch.bool))

    def state_dict(self) -> dict:
        return {"baseline": self.feedback.baseline, "alignment": self.alignment.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.feedback.baseline = float(state["baseline"])
        if "alignment" in state:  # checkpoints from before distribution alignment: it was off
            self.alignment.load_state_dict(state["alignment"])
