"""Optimizers and learning-rate schedules, one pair per trained role."""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_ssl.config import OptimConfig


def build_optimizer(net: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # Weight decay on weights only: biases and normalization scales are not decayed (FixMatch, MPL).
    decay = [p for p in net.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then `cosine` (half a cosine to 0, as MPL), `cosine_7_16` (FixMatch's
    cos(7 pi k / 16 K)) or `constant`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "cosine_7_16":
        return math.cos(7 * math.pi * progress / 16)
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
