"""FixMatch: pseudo-label the weak view where the model is confident (>= tau), train the strong view
on it. One forward pass over [labeled, weak, strong] so batch norm sees the concatenated batch."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from dist_ssl.methods.base import Method, StepContext, StepOutput, TrainBatch


class FixMatch(Method):
    unlabeled_views = ("weak", "strong")

    def train_step(self, batch: TrainBatch, ctx: StepContext) -> StepOutput:
        cfg = self.cfg.method.fixmatch
        weak, strong = batch.unlabeled["weak"], batch.unlabeled["strong"]
        n_l, n_u = len(batch.labeled_x), len(weak)
        logits = self.nets["model"](torch.cat([batch.labeled_x, weak, strong]))
        logits_l, logits_w, logits_s = logits[:n_l], logits[n_l : n_l + n_u], logits[n_l + n_u :]
        loss_l = F.cross_entropy(logits_l, batch.labeled_y)
        confidence, pseudo = torch.softmax(logits_w.detach().float() / cfg.temperature, dim=1).max(dim=1)
        mask = confidence >= cfg.threshold
        loss_u = (F.cross_entropy(logits_s, pseudo, reduction="none") * mask).mean()
        loss = loss_l + cfg.unlabeled_weight * loss_u
        ctx.optimize("model", loss)
        metrics = {
            "loss": loss.detach(),
            "loss_labeled": loss_l.detach(),
            "loss_unlabeled": loss_u.detach(),
            "mask_rate": mask.float().mean(),
        }
        return StepOutput(metrics, pseudo_labels=pseudo, mask=mask)
