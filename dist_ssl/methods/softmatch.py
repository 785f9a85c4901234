"""SoftMatch (Chen et al. 2023): every pseudo-label teaches, weighted by how its confidence compares
with the model's usual confidence, instead of a hard threshold that drops most samples early and
admits wrong ones late.

Each step, on the weak view's softmax p_b of the global unlabeled batch (USB's order: each statistic
takes the current batch before it is used):

1. Uniform alignment (`uniform_alignment`): the moving mean probability m_t = lambda m_{t-1} +
   (1 - lambda) mean_b p_b, which starts at the first batch's mean (USB), rescales
   p_b(c) * (1/C + 1e-6) / (m_t(c) + 1e-6), renormalized: classes the model under-predicts gain
   confidence, so the weights below do not starve them.
2. On the aligned confidence x_b = max_c p_b(c): mu_t = lambda mu_{t-1} + (1 - lambda) mean_b x_b and
   var_t = lambda var_{t-1} + (1 - lambda) unbiased variance of x_b, from 1/C and 1.
3. Weight w_b = exp(-min(x_b - mu_t, 0)^2 / (2 var_t / n^2)), n = `n_sigma` (2): 1 at and above the
   mean confidence, a truncated Gaussian below it.

The strong view learns the aligned argmax (hard labels, as USB): loss_u = mean_b w_b CE(strong_b, y_b).
lambda = `ema_decay` (0.999). The means and variance are sums over every rank (`ctx.reduce_sum`), so
the weights do not depend on the number of processes (USB's SoftMatch gathers through a method that
does not exist and fails on more than one GPU).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_ssl.config import Config
from dist_ssl.methods.base import Method, StepContext, StepOutput, TrainBatch, full, weak_strong_forward, weighted_cross_entropy

ALIGNMENT_EPSILON = 1e-6  # USB's, in both the uniform target and the moving mean


def sample_weights(confidence: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor, n_sigma: float) -> torch.Tensor:
    """Truncated Gaussian: 1 at and above `mean`, exp(-d^2 / (2 variance / n^2)) at d below it."""
    below = torch.clamp(confidence - mean, max=0.0)
    return torch.exp(-(below**2) / (2 * variance.clamp_min(1e-12) / n_sigma**2))


def uniform_aligned(probs: torch.Tensor, class_mean: torch.Tensor) -> torch.Tensor:
    k = probs.shape[1]
    aligned = probs * (1.0 / k + ALIGNMENT_EPSILON) / (class_mean + ALIGNMENT_EPSILON)
    return aligned / aligned.sum(dim=1, keepdim=True)


class SoftMatch(Method):
    unlabeled_views = ("weak", "strong")

    def __init__(self, cfg: Config, nets: dict[str, nn.Module], num_classes: int, pool_size: int = 0):
        super().__init__(cfg, nets, num_classes, pool_size)
        self.settings = cfg.method.softmatch
        self.mean = torch.tensor(1.0 / num_classes, dtype=torch.float64)  # mu_t
        self.variance = torch.tensor(1.0, dtype=torch.float64)  # var_t
        self.class_mean: torch.Tensor | None = None  # m_t; None until the first batch

    def align(self, probs: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Move m_t by the global batch's mean probability; `probs` aligned by it."""
        local = torch.cat([probs.sum(dim=0), torch.tensor([float(len(probs))], dtype=torch.float64, device=probs.device)])
        sums = ctx.reduce_sum(local)
        batch_mean = sums[:-1] / sums[-1]
        decay = self.settings.ema_decay
        self.class_mean = batch_mean if self.class_mean is None else decay * self.class_mean.to(probs.device) + (1 - decay) * batch_mean
        return uniform_aligned(probs, self.class_mean)

    def update(self, confidence: torch.Tensor, ctx: StepContext) -> None:
        """Move mu_t and var_t by the global batch's confidence mean and unbiased variance."""
        one = torch.ones(1, dtype=torch.float64, device=confidence.device)
        sums = ctx.reduce_sum(torch.cat([confidence.sum().view(1), (confidence**2).sum().view(1), one * len(confidence)]))
        total, squares, count = sums.unbind()
        mean = total / count
        variance = (squares - total * mean) / (count - 1).clamp_min(1)
        decay = self.settings.ema_decay
        self.mean = decay * self.mean.to(confidence.device) + (1 - decay) * mean
        self.variance = decay * self.variance.to(confidence.device) + (1 - decay) * variance.clamp_min(0)

    def train_step(self, batch: TrainBatch, ctx: StepContext) -> StepOutput:
        cfg = self.settings
        loss_l, logits_w, logits_s = weak_strong_forward(self.nets["model"], batch, self.cfg.method.concat_forward)
        probs = torch.softmax(full(logits_w.detach()), dim=1).double()
        if cfg.uniform_alignment:
            probs = self.align(probs, ctx)
        confidence, pseudo = probs.max(dim=1)
        self.update(confidence, ctx)
        weight = sample_weights(confidence, self.mean, self.variance, cfg.n_sigma)
        loss_u = weighted_cross_entropy(logits_s, pseudo, weight)
        loss = loss_l + cfg.unlabeled_weight * loss_u
        ctx.optimize("model", loss)
        metrics = {
            "loss": loss.detach(),
            "loss_labeled": loss_l.detach(),
            "loss_unlabeled": loss_u.detach(),
            "mask_rate": weight.mean(),  # the mean weight: what a mask rate is to a hard threshold
            "threshold": self.mean,  # the confidence from which a sample weighs fully
            "confidence_std": self.variance.sqrt(),
        }
        if self.class_mean is not None:  # each class's alignment factor: > 1 for classes the model under-predicts
            factors = (1.0 / self.num_classes + ALIGNMENT_EPSILON) / (self.class_mean + ALIGNMENT_EPSILON)
            metrics.update({f"alignment/class_{c}": value for c, value in enumerate(factors.unbind())})
        # every pseudo-label reaches the loss, with its weight
        return StepOutput(metrics, pseudo_labels=pseudo, mask=torch.ones_like(pseudo, dtype=torch.bool))

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu().clone(), "variance": self.variance.cpu().clone(),
                "class_mean": None if self.class_mean is None else self.class_mean.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.variance = state["mean"].clone(), state["variance"].clone()
        self.class_mean = None if state["class_mean"] is None else state["class_mean"].clone()
