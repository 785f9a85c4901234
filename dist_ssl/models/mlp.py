"""A plain ReLU multi-layer perceptron for vector data (seed 002's two-moons net: 8-8)."""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_ssl.config import ModelConfig


class MLP(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = math.prod(input_shape)
        for hidden in cfg.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))
