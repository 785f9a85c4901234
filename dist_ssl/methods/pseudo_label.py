"""Pseudo-Label (Lee 2013): loss = CE(labeled) + alpha(t) * CE(unlabeled, argmax of own prediction).

alpha(t) = 0 before T1, rises linearly to alpha_f at T2, then stays (t in epochs, fractional).
Pseudo-labels come from the same forward pass, detached, and are recomputed at every step as in
the paper. An optional confidence threshold masks uncertain ones (0 keeps Lee's original).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from dist_ssl.methods.base import Method, StepContext, StepOutput, TrainBatch


def alpha(epoch: float, alpha_final: float, start: float, end: float) -> float:
    if epoch < start:
        return 0.0
    if epoch >= end:
        return alpha_final
    return alpha_final * (epoch - start) / (end - start)


class PseudoLabel(Method):
    unlabeled_views = ("weak",)

    def train_step(self, batch: TrainBatch, ctx: StepContext) -> StepOutput:
        cfg = self.cfg.method.pseudo_label
        weight = alpha(ctx.epoch, cfg.alpha_final, cfg.ramp_start_epoch, cfg.ramp_end_epoch)
        net = self.nets["model"]
        if weight == 0.0:  # before T1 the unlabeled term is zero: skip its forward pass
            loss = F.cross_entropy(net(batch.labeled_x), batch.labeled_y)
            ctx.optimize("model", loss)
            return StepOutput({"loss": loss.detach(), "loss_labeled": loss.detach(), "alpha": weight})
        unlabeled = batch.unlabeled["weak"]
        logits = net(torch.cat([batch.labeled_x, unlabeled]))
        logits_l, logits_u = logits[: len(batch.labeled_x)], logits[len(batch.labeled_x) :]
        loss_l = F.cross_entropy(logits_l, batch.labeled_y)
        confidence, pseudo = torch.softmax(logits_u.detach().float(), dim=1).max(dim=1)
        mask = confidence >= cfg.threshold
        loss_u = (F.cross_entropy(logits_u, pseudo, reduction="none") * mask).mean()
        loss = loss_l + weight * loss_u
        ctx.optimize("model", loss)
        metrics = {
            "loss": loss.detach(),
            "loss_labeled": loss_l.detach(),
            "loss_unlabeled": loss_u.detach(),
            "alpha": weight,
            "mask_rate": mask.float().mean(),
        }
        return StepOutput(metrics, pseudo_labels=pseudo, mask=mask)
