"""Distribution alignment (ReMixMatch), for the methods that pseudo-label: `method.fixmatch`,
`method.flexmatch`, `method.mpl` and `method.smpl` each have a `distribution_alignment` decay (0 = off)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from dist_ssl.methods.base import StepContext, full


class Alignment:
    """Distribution alignment (ReMixMatch, Berthelot et al. 2020): the pseudo-labeler's class
    probabilities times p(y) / m, renormalized, with p(y) the class distribution of the labels seen
    and m the labeler's mean prediction on the unlabeled batches: moving averages with `decay` of the
    global batch's figures, so every rank aligns alike. Both start uniform, so alignment phases in
    over about 1 / (1 - decay) steps and a class absent from the first labeled batches is not
    suppressed. Self-training from a few labels drifts to one class and then confirms
    it (two moons, 3 labels per class: one class took the whole plane but for islands around its own
    labels in 2 of 10 draws); alignment keeps the pseudo-labels' class balance at the labels'."""

    def __init__(self, decay: float, num_classes: int):
        self.decay = decay
        self.labeled = [1.0 / num_classes] * num_classes
        self.predicted = [1.0 / num_classes] * num_classes

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """Update from this step's labels and the labeler's `logits`; the log-factor for `aligned`
        (None when alignment is off)."""
        if self.decay == 0:
            return None
        probs = torch.softmax(full(logits.detach()), dim=1).double()
        # class indices, or class probabilities for a labeled split of soft pseudo-labels
        counts = (labels.double() if labels.is_floating_point() else F.one_hot(labels, logits.shape[1]).double()).sum(dim=0)
        sizes = torch.tensor([len(labels), len(probs)], dtype=torch.float64, device=probs.device)
        sums = ctx.reduce_sum(torch.cat([counts, probs.sum(dim=0), sizes])).tolist()
        k = logits.shape[1]
        labeled = [c / max(sums[2 * k], 1.0) for c in sums[:k]]
        predicted = [p / max(sums[2 * k + 1], 1.0) for p in sums[k : 2 * k]]
        self.labeled = [self.decay * a + (1 - self.decay) * b for a, b in zip(self.labeled, labeled)]
        self.predicted = [self.decay * a + (1 - self.decay) * b for a, b in zip(self.predicted, predicted)]
        ratio = torch.tensor(self.labeled, dtype=torch.float64) / torch.tensor(self.predicted, dtype=torch.float64).clamp_min(1e-12)
        return torch.log(ratio.clamp_min(1e-12)).to(device=logits.device, dtype=torch.float32)

    def state_dict(self) -> dict:
        return {"labeled": list(self.labeled), "predicted": list(self.predicted)}

    def load_state_dict(self, state: dict) -> None:
        self.labeled = [float(v) for v in state["labeled"]]
        self.predicted = [float(v) for v in state["predicted"]]


def aligned(logits: torch.Tensor, log_factor: torch.Tensor | None) -> torch.Tensor:
    """Logits whose softmax is the aligned distribution, for targets only (detached)."""
    if log_factor is None:
        return logits
    return torch.log_softmax(full(logits.detach()), dim=1) + log_factor
