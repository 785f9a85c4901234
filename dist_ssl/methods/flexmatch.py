"""FlexMatch (Zhang et al. 2021): FixMatch with a threshold per class that follows how well the
model has learned that class (curriculum pseudo-labeling), so hard classes are not starved early.

State: each unlabeled sample's latest confident prediction (its class once its weak-view confidence
reached tau = `threshold`, 0.95; -1 before), a table over the whole pool indexed by the sample's
index in its split (`TrainBatch.unlabeled_index`, from the manifest's shard order and the sample's
place in its shard: the same whatever rank, worker or epoch reads it).

Each step, from the table as the previous step left it (TorchSSL and USB mask with the previous
step's status, so the first mask keeps everything):

    sigma(c) = samples whose latest confident prediction is c;  N = pool size
    beta(c)  = sigma(c) / max(max_c sigma, N - sum_c sigma)     (`warmup`; without: / max_c sigma)
    T(c)     = M(beta(c)) * tau,  M(x) = x / (2 - x)             (the convex mapping)

A sample is used when its weak-view confidence reaches T of its predicted class; the strong view
learns that class (hard labels). The warm-up counts the samples without a confident prediction yet,
so thresholds stay low while most of the pool is unexplored.

Global, not per GPU: the (sample, class) updates of every rank are gathered (`ctx.gather`) and
applied on every rank, so all ranks hold the same table and 1 or N processes take the same steps
(TorchSSL and USB keep a table per GPU of the samples it read). The table is method state, saved in
checkpoints (TorchSSL's are not: a resumed run restarted its curriculum), one byte per sample (two
above 127 classes) on every rank: `max_pool_size` refuses a bigger pool.

With `distribution_alignment` the weak view's softmax is aligned first (methods/alignment.py, as
FixMatch's), so the confidences, the pseudo-labels and the statuses recorded are the aligned ones.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_ssl.config import Config
from dist_ssl.errors import UserError
from dist_ssl.methods.alignment import Alignment, aligned
from dist_ssl.methods.base import Method, StepContext, StepOutput, TrainBatch, full, weak_strong_forward, weighted_cross_entropy


def class_thresholds(status: torch.Tensor, num_classes: int, threshold: float, warmup: bool) -> torch.Tensor:
    """T(c) from the per-sample table `status` (class, or -1 for none yet)."""
    counts = torch.bincount(status.long() + 1, minlength=num_classes + 1).double()
    unused, sigma = counts[0], counts[1:]
    denominator = torch.maximum(sigma.max(), unused) if warmup else sigma.max()
    beta = sigma / denominator.clamp_min(1)  # nothing confident yet (no warm-up): beta = 0
    return threshold * beta / (2 - beta)


def status_dtype(num_classes: int) -> torch.dtype:
    return torch.int8 if num_classes <= 127 else torch.int16 if num_classes <= 32767 else torch.int32


class FlexMatch(Method):
    unlabeled_views = ("weak", "strong")

    def __init__(self, cfg: Config, nets: dict[str, nn.Module], num_classes: int, pool_size: int = 0):
        super().__init__(cfg, nets, num_classes, pool_size)
        self.settings = cfg.method.flexmatch
        if pool_size > self.settings.max_pool_size:
            raise UserError(
                f"method 'flexmatch' keeps a learning status per unlabeled sample, and the pool has {pool_size:,} samples, "
                f"above method.flexmatch.max_pool_size={self.settings.max_pool_size:,}: raise it, or use method.name=freematch, "
                "whose adaptive thresholds need no per-sample state"
            )
        self.status = torch.full((pool_size,), -1, dtype=status_dtype(num_classes))
        self.alignment = Alignment(self.settings.distribution_alignment, num_classes)

    def update(self, index: torch.Tensor, pseudo: torch.Tensor, confident: torch.Tensor, ctx: StepContext) -> None:
        """Record every rank's confident predictions in every rank's table."""
        pairs = ctx.gather(torch.stack([index, torch.where(confident, pseudo, -1)], dim=1).contiguous())
        pairs = pairs[pairs[:, 1] >= 0]
        # a sample twice in one global batch (ranks on either side of an epoch boundary): the higher
        # class wins, so the table does not depend on the order in which the ranks' pairs arrive
        samples, which = torch.unique(pairs[:, 0], return_inverse=True)
        classes = torch.full_like(samples, -1).scatter_reduce(0, which, pairs[:, 1], "amax")
        self.status[samples] = classes.to(self.status.dtype)

    def train_step(self, batch: TrainBatch, ctx: StepContext) -> StepOutput:
        cfg = self.settings
        loss_l, logits_w, logits_s = weak_strong_forward(self.nets["model"], batch, self.cfg.method.concat_forward)
        weak_logits = aligned(logits_w, self.alignment(logits_w, batch.labeled_y, ctx))
        confidence, pseudo = torch.softmax(full(weak_logits.detach()), dim=1).max(dim=1)
        self.status = self.status.to(confidence.device)
        thresholds = class_thresholds(self.status, self.num_classes, cfg.threshold, cfg.warmup)  # the previous step's status
        mask = confidence.double() >= thresholds[pseudo]
        unused = (self.status < 0).sum() / max(len(self.status), 1)
        self.update(batch.unlabeled_index, pseudo, confidence >= cfg.threshold, ctx)
        loss_u = weighted_cross_entropy(logits_s, pseudo, mask)
        loss = loss_l + cfg.unlabeled_weight * loss_u
        ctx.optimize("model", loss)
        metrics = {
            "loss": loss.detach(),
            "loss_labeled": loss_l.detach(),
            "loss_unlabeled": loss_u.detach(),
            "mask_rate": mask.float().mean(),
            "threshold": thresholds.mean(),  # over classes; tau is the highest any class can reach
            "unused_fraction": unused,  # of the pool without a confident prediction yet (the warm-up's N - sum sigma)
        }
        metrics.update({f"threshold/class_{c}": value for c, value in enumerate(thresholds.unbind())})
        return StepOutput(metrics, pseudo_labels=pseudo, mask=mask)

    def state_dict(self) -> dict:
        return {"status": self.status.cpu().clone(), "alignment": self.alignment.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        status = state["status"]
        if status.shape != self.status.shape:
            raise UserError(
                f"the checkpoint's FlexMatch status covers {len(status):,} unlabeled samples, this run's pool has "
                f"{len(self.status):,}: resume with the same data.unlabeled split (or train.resume=never)"
            )
        self.status = status.to(self.status.dtype).clone()
        if "alignment" in state:  # checkpoints from before FlexMatch had distribution alignment: it was off
            self.alignment.load_state_dict(state["alignment"])
