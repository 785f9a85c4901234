"""Optimizers and learning-rate schedules (one pair per optimizer a method declares), and the
`optimize(name, loss)` the engine hands to methods."""

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


class Stepper:
    """`ctx.optimize(name, loss)`: backward (mixed-precision scaling by accelerate), gradient clipping,
    the optimizer's step, its schedule's step, zeroing. `step` is the training step being taken."""

    def __init__(self, accelerator, nets: dict[str, nn.Module], specs: dict, optimizers: dict, schedulers: dict):
        self.accelerator, self.nets, self.specs = accelerator, nets, specs
        self.optimizers, self.schedulers = optimizers, schedulers
        self.step = 0

    def __call__(self, name: str, loss: torch.Tensor) -> None:
        spec, optimizer = self.specs[name], self.optimizers[name]
        if self.step < spec.wait_steps:
            raise RuntimeError(f"optimizer '{name}' was stepped at step {self.step}, before its {spec.wait_steps} wait steps ended")
        self.accelerator.backward(loss)
        if spec.optim.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.nets[spec.net].parameters(), spec.optim.grad_clip)
        optimizer.step()
        self.schedulers[name].step()
        optimizer.zero_grad(set_to_none=True)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, for what every rank must agree on (MPL's feedback)."""
        return self.accelerator.reduce(tensor, "sum") if self.accelerator.num_processes > 1 else tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor concatenated in rank order (FlexMatch's per-sample updates)."""
        return self.accelerator.gather(tensor) if self.accelerator.num_processes > 1 else tensor
