"""What a method is: it computes losses and says what to step; the engine does the rest.

A method never calls backward or an optimizer itself. It calls `ctx.optimize(name, loss)`, which
the engine implements (backward, mixed-precision scaling, clipping, optimizer and schedule step).
FixMatch calls it once per step; a teacher-student method calls it once per role, in the order its
algorithm needs. Each network has one optimizer by default; a method may declare more than one over
the same network (SMPL's plain SGD step on its own pseudo-labels, then its main step).

Each `optimize` runs a backward pass of its own, so under DDP every loss must come from a forward
pass that no other `optimize` call has back-propagated through: a second backward through one
forward is not averaged over ranks (DDP reduces gradients once per forward), and ranks drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from dist_ssl.config import Config, OptimConfig, role_optim, role_wait_steps


def full(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the losses (mixed precision hands bf16/fp16 ones)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _same_everywhere(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class TrainBatch:
    labeled_x: torch.Tensor
    # class indices [B] (long), or class probabilities [B, C] (float) for a split of soft
    # pseudo-labels; F.cross_entropy takes either, so a method's labeled loss needs no branch.
    labeled_y: torch.Tensor
    unlabeled: dict[str, torch.Tensor] = field(default_factory=dict)  # views by name; never the hidden truth
    # each unlabeled sample's index in the pool (0..pool_size-1), the same whatever rank reads it
    unlabeled_index: torch.Tensor | None = None


@dataclass
class StepContext:
    step: int  # the global step being taken, from 0
    epoch: float  # step / steps_per_epoch
    total_steps: int
    optimize: Callable[[str, torch.Tensor], None]
    # Sum of a tensor over ranks (identity on one process): for quantities every rank must agree on.
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _same_everywhere
    # Every rank's tensor concatenated along dim 0, in rank order (identity on one process); the
    # shapes must agree, as per-rank batches do.
    gather: Callable[[torch.Tensor], torch.Tensor] = _same_everywhere


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer the engine builds: over network `net`, with these settings, idle for `wait_steps`
    steps (its schedule then spans the remaining ones)."""

    net: str
    optim: OptimConfig
    wait_steps: int = 0


@dataclass
class StepOutput:
    metrics: dict[str, torch.Tensor | float]  # scalars to log (tensors are detached by the method)
    pseudo_labels: torch.Tensor | None = None  # for monitoring against the hidden truth
    mask: torch.Tensor | None = None  # which pseudo-labels reached the loss (bool)


class Method:
    roles: tuple[str, ...] = ("model",)  # networks the method trains, each with its own optimizer
    eval_role: str = "model"  # the network that is evaluated and exported
    labeled_view: str = "weak"
    unlabeled_views: tuple[str, ...] = ()  # empty: the method does not read the unlabeled pool

    @classmethod
    def optimizer_specs(cls, cfg: Config) -> dict[str, OptimizerSpec]:
        """Optimizer name -> spec. One per network by default, named like it, with its role's settings."""
        return {role: OptimizerSpec(role, role_optim(cfg, role), role_wait_steps(cfg, role)) for role in cls.roles}

    def __init__(self, cfg: Config, nets: dict[str, nn.Module], num_classes: int, pool_size: int = 0):
        """`pool_size`: samples in the unlabeled split (0 without one), for per-sample state."""
        self.cfg = cfg
        self.nets = nets
        self.num_classes = num_classes
        self.pool_size = pool_size

    def train_step(self, batch: TrainBatch, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Method state that a checkpoint must keep (moving baselines...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def weak_strong_forward(net: nn.Module, batch: TrainBatch, concat: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FixMatch family's forward: the labeled loss, and the weak and strong views' logits.

    `concat` (`method.concat_forward`): FixMatch's one pass over [labeled, weak, strong], so batch
    norm sees the concatenated batch. Otherwise (USB's `use_cat=False`) [labeled, strong] is one pass
    and the weak view another without gradients: every method here only reads the weak logits as
    targets, detached, so the backward pass over the weak rows (a third of the batch at 1:1 views,
    all zeros) is skipped. The price: batch norm normalizes the weak view by its own statistics.
    """
    weak, strong = batch.unlabeled["weak"], batch.unlabeled["strong"]
    if concat:
        logits_l, logits_w, logits_s = net(torch.cat([batch.labeled_x, weak, strong])).split([len(batch.labeled_x), len(weak), len(strong)])
    else:
        logits_l, logits_s = net(torch.cat([batch.labeled_x, strong])).split([len(batch.labeled_x), len(strong)])
        with torch.no_grad():
            logits_w = net(weak)
    return F.cross_entropy(logits_l, batch.labeled_y), logits_w, logits_s


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each sample's cross-entropy times its weight (a 0/1 mask, or SoftMatch's
    weights): the batch size, not the weights' sum, divides, as in FixMatch."""
    return (F.cross_entropy(logits, labels, reduction="none") * weight.to(logits.dtype)).mean()
