"""FreeMatch (Wang et al. 2023): FixMatch whose threshold follows the model's own confidence, per
class, with a loss that keeps the pseudo-labels' classes as balanced as the model's predictions.

Each step, the weak view's softmax p_b of the global unlabeled batch first moves three averages with
decay lambda (`ema_decay`, 0.999), all starting at 1/C (paper and USB); the batch's own mask is then
computed from the moved ones:

    tau_t   = lambda tau_{t-1} + (1 - lambda) mean_b max_c p_b(c)       global threshold
    p~_t    = lambda p~_{t-1}  + (1 - lambda) mean_b p_b                 class distribution
    h~_t    = lambda h~_{t-1}  + (1 - lambda) hist_b(argmax_c p_b(c))    predicted-class histogram (sums to 1)

A sample of predicted class c is used when max_c p_b(c) >= tau_t(c) = tau_t p~_t(c) / max_c' p~_t(c')
(MaxNorm); the strong view learns that class (hard labels, as USB). Early on tau_t is near 1/C, so
nearly every sample teaches, and it rises with the model's confidence instead of waiting for 0.95.

Self-adaptive fairness (USB's `entropy_loss`, weight `fairness_weight`, 0.01 = USB's ent_loss_ratio):
over the masked samples' strong-view softmax q, with hist_s the histogram of their argmax,

    L_f = -H(norm(p~_t / h~_t), norm(mean q / hist_s))
        = sum_c  norm(p~_t / h~_t)(c) * log(norm(mean q / hist_s)(c) + 1e-12),   norm(v) = v / sum v

the paper's negative cross-entropy, with USB's sign (its `entropy_loss` returns this sum, added with
+ent_loss_ratio): minimizing it lowers the batch's normalized confidence on the classes whose
normalized confidence the model already holds high, which is what keeps the classes fair; the
cross-entropy itself would pull the batch towards the model's bias. The value is negative. A class
with no masked sample has hist_s = 0 and its factor is 0, as USB's replace_inf_to_zero.

Global, not per GPU: the three averages move by sums over every rank (`ctx.reduce_sum`), and L_f's
mean q and hist_s are those of the global batch, with each rank's gradient flowing through its own
samples; the term is multiplied by the number of ranks so that DDP's average of the ranks' gradients
is the one-process gradient. USB gathers FreeMatch's batches too, but its batch size is per GPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dist_ssl.config import Config
from dist_ssl.methods.base import Method, StepContext, StepOutput, TrainBatch, full, weak_strong_forward, weighted_cross_entropy


def class_thresholds(threshold: torch.Tensor, class_distribution: torch.Tensor) -> torch.Tensor:
    """tau_t(c) = tau_t * p~_t(c) / max_c p~_t (MaxNorm)."""
    return threshold * class_distribution / class_distribution.max()


def fairness_loss(masked_probs_sum: torch.Tensor, masked_counts: torch.Tensor, class_distribution: torch.Tensor,
                  histogram: torch.Tensor) -> torch.Tensor:
    """L_f from the masked strong-view softmax summed over the (global) batch [C], the masked samples'
    argmax counts [C], p~_t and h~_t. mean q / hist_s = sum q / counts, per class."""
    model = torch.where(histogram > 0, class_distribution / histogram, torch.zeros_like(histogram))
    model = model / model.sum()
    batch = torch.where(masked_counts > 0, masked_probs_sum / masked_counts.clamp_min(1), torch.zeros_like(masked_probs_sum))
    batch = batch / batch.sum().clamp_min(torch.finfo(batch.dtype).tiny)
    loss = (model * torch.log(batch + 1e-12)).sum()  # -H: USB's sign (the module's docstring)
    return loss * (masked_counts.sum() > 0)  # no masked sample anywhere: no term (USB: 0)


class FreeMatch(Method):
    unlabeled_views = ("weak", "strong")

    def __init__(self, cfg: Config, nets: dict[str, nn.Module], num_classes: int, pool_size: int = 0):
        super().__init__(cfg, nets, num_classes, pool_size)
        self.settings = cfg.method.freematch
        uniform = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
        self.threshold = torch.tensor(1.0 / num_classes, dtype=torch.float64)  # tau_t
        self.class_distribution = uniform.clone()  # p~_t
        self.histogram = uniform.clone()  # h~_t

    def update(self, probs: torch.Tensor, ctx: StepContext) -> None:
        """Move tau, p~ and h~ by the global batch's weak-view softmax `probs` [B, C]."""
        k, device = probs.shape[1], probs.device
        probs = probs.double()
        predicted = F.one_hot(probs.argmax(dim=1), k).double()
        local = torch.cat([probs.max(dim=1).values.sum().view(1), probs.sum(dim=0), predicted.sum(dim=0),
                           torch.tensor([float(len(probs))], dtype=torch.float64, device=device)])
        sums = ctx.reduce_sum(local)
        count, decay = sums[-1], self.settings.ema_decay
        self.threshold = decay * self.threshold.to(device) + (1 - decay) * sums[0] / count
        self.class_distribution = decay * self.class_distribution.to(device) + (1 - decay) * sums[1 : 1 + k] / count
        self.histogram = decay * self.histogram.to(device) + (1 - decay) * sums[1 + k : 1 + 2 * k] / count

    def train_step(self, batch: TrainBatch, ctx: StepContext) -> StepOutput:
        cfg = self.settings
        loss_l, logits_w, logits_s = weak_strong_forward(self.nets["model"], batch, self.cfg.method.concat_forward)
        probs = torch.softmax(full(logits_w.detach()), dim=1)
        confidence, pseudo = probs.max(dim=1)
        self.update(probs, ctx)  # the batch enters the statistics before its own mask
        thresholds = class_thresholds(self.threshold, self.class_distribution)
        mask = confidence.double() >= thresholds[pseudo]
        loss_u = weighted_cross_entropy(logits_s, pseudo, mask)
        loss = loss_l + cfg.unlabeled_weight * loss_u
        metrics = {"loss_labeled": loss_l.detach(), "loss_unlabeled": loss_u.detach(), "mask_rate": mask.float().mean(), "threshold": self.threshold}
        metrics.update({f"threshold/class_{c}": value for c, value in enumerate(thresholds.unbind())})
        if cfg.fairness_weight > 0:
            fair, ranks = self._fairness(logits_s, mask, ctx)
            loss = loss + (cfg.fairness_weight * ranks * fair).to(loss.dtype)
            metrics["loss_fairness"] = fair.detach()
        ctx.optimize("model", loss)
        metrics["loss"] = loss.detach()
        return StepOutput(metrics, pseudo_labels=pseudo, mask=mask)

    def _fairness(self, logits_s: torch.Tensor, mask: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_f of the global batch with gradient through this rank's samples, number of ranks)."""
        k = logits_s.shape[1]
        probs_s = torch.softmax(full(logits_s), dim=1)
        masked_sum = (probs_s * mask[:, None]).sum(dim=0).double()
        counts = (F.one_hot(probs_s.detach().argmax(dim=1), k) * mask[:, None]).sum(dim=0).double()
        local = torch.cat([masked_sum.detach(), counts, torch.ones(1, dtype=torch.float64, device=counts.device)])
        sums = ctx.reduce_sum(local)
        # the other ranks' sums are constants here: each rank differentiates through its own samples
        global_sum = masked_sum + (sums[:k] - local[:k])
        return fairness_loss(global_sum, sums[k : 2 * k], self.class_distribution, self.histogram), sums[2 * k]

    def state_dict(self) -> dict:
        return {"threshold": self.threshold.cpu().clone(), "class_distribution": self.class_distribution.cpu().clone(),
                "histogram": self.histogram.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = state["threshold"].clone()
        self.class_distribution = state["class_distribution"].clone()
        self.histogram = state["histogram"].clone()
