"""FixMatch: pseudo-label the weak view where the model is confident (>= tau), train the strong view
on it. One forward pass over [labeled, weak, strong] so batch norm sees the concatenated batch.
With `distribution_alignment` the weak view's softmax is aligned (methods/alignment.py) before the
confidence and the label are read from it."""

from __future__ import annotations

import torch
from torch import nn

from dist_ssl.config import Config
from dist_ssl.methods.alignment import Alignment, aligned
from dist_ssl.methods.base import Method, StepContext, StepOutput, TrainBatch, weak_strong_forward, weighted_cross_entropy


class FixMatch(Method):
    unlabeled_views = ("weak", "strong")

    def __init__(self, cfg: Config, nets: dict[str, nn.Module], num_classes: int, pool_size: int = 0):
        super().__init__(cfg, nets, num_classes, pool_size)
        self.alignment = Alignment(cfg.method.fixmatch.distribution_alignment, num_classes)

    def train_step(self, batch: TrainBatch, ctx: StepContext) -> StepOutput:
        cfg = self.cfg.method.fixmatch
        loss_l, logits_w, logits_s = weak_strong_forward(self.nets["model"], batch, self.cfg.method.concat_forward)
        weak_logits = aligned(logits_w, self.alignment(logits_w, batch.labeled_y, ctx))
        confidence, pseudo = torch.softmax(weak_logits.detach().float() / cfg.temperature, dim=1).max(dim=1)
        mask = confidence >= cfg.threshold
        loss_u = weighted_cross_entropy(logits_s, pseudo, mask)
        loss = loss_l + cfg.unlabeled_weight * loss_u
        ctx.optimize("model", loss)
        metrics = {
            "loss": loss.detach(),
            "loss_labeled": loss_l.detach(),
            "loss_unlabeled": loss_u.detach(),
            "mask_rate": mask.float().mean(),
        }
        return StepOutput(metrics, pseudo_labels=pseudo, mask=mask)

    def state_dict(self) -> dict:
        return {"alignment": self.alignment.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "alignment" in state:  # checkpoints from before distribution alignment: it was off
            self.alignment.load_state_dict(state["alignment"])
