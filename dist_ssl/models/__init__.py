"""Model registry: name -> class (or builder) taking (num_classes, input_shape, ModelConfig)."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from dist_ssl.config import ModelConfig
from dist_ssl.errors import UserError
from dist_ssl.models.cnn import MnistCNN, SmallCNN, SmallCNN3, SmallCNN4
from dist_ssl.models.mlp import MLP
from dist_ssl.models.torchvision_nets import densenet121, resnet50
from dist_ssl.models.wide_resnet import WideResNet28x2, WideResNet28x8

MODELS: dict[str, Callable[[int, tuple[int, ...], ModelConfig], nn.Module]] = {
    "small_cnn": SmallCNN,
    "small_cnn3": SmallCNN3,
    "small_cnn4": SmallCNN4,
    "mnist_cnn": MnistCNN,
    "mlp": MLP,
    "wide_resnet28_2": WideResNet28x2,
    "wide_resnet28_8": WideResNet28x8,
    "densenet121": densenet121,
    "resnet50": resnet50,
}


def build_model(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    if cfg.name not in MODELS:
        near = difflib.get_close_matches(cfg.name, list(MODELS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"unknown model '{cfg.name}'{hint}; choose from: {', '.join(MODELS)}")
    try:
        return MODELS[cfg.name](num_classes, tuple(input_shape), cfg)
    except ValueError as exc:
        raise UserError(f"model '{cfg.name}': {exc}") from None
