"""Supervised baseline: cross-entropy on the labeled split only."""

from __future__ import annotations

from torch.nn import functional as F

from dist_ssl.methods.base import Method, StepContext, StepOutput, TrainBatch


class Supervised(Method):
    def train_step(self, batch: TrainBatch, ctx: StepContext) -> StepOutput:
        loss = F.cross_entropy(self.nets["model"](batch.labeled_x), batch.labeled_y)
        ctx.optimize("model", loss)
        return StepOutput({"loss": loss.detach(), "loss_labeled": loss.detach()})
