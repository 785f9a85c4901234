"""The small convolutional networks of the seed documents, sized from the input shape."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dist_ssl.config import ModelConfig


def image_shape(input_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs images (C, H, W); this dataset has inputs of shape {tuple(input_shape)} (use mlp)")
    return input_shape


class SmallCNN(nn.Module):
    """Seed 003's CIFAR network: two padded 3x3 convolutions (32, 64) with 2x2 pooling, fc 128.

    Batch norm after each convolution (with `model.bn_momentum`) keeps training stable at the
    learning rates SSL methods use; the seed network had none.
    """

    name = "small_cnn"

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], cfg: ModelConfig):
        super().__init__()
        channels, height, width = image_shape(input_shape, self.name)
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32, momentum=cfg.bn_momentum)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=cfg.bn_momentum)
        self.fc1 = nn.Linear(64 * (height // 4) * (width // 4), 128)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc2 = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # In place: neither batch norm's nor a linear layer's backward reads its output.
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x)), inplace=True), 2)
        return F.max_pool2d(F.relu(self.bn2(self.conv2(x)), inplace=True), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(self.features(x).flatten(1)), inplace=True)
        return self.fc2(self.dropout(x))


class SmallCNN3(SmallCNN):
    """small_cnn with a third 3x3 convolution (64, batch norm) at quarter resolution, before fc.

    At 28x28 it costs ~1.1x small_cnn's step on CPU (the added layer runs on 7x7 maps) and learns
    more per step: Fashion-MNIST with every label, 4,000 steps, 89.7 % against 88.8 %; FlexMatch at
    100 labels per class in ~33 minutes on 2 cores, 86.7 % against 85.9 % (one label draw;
    docs/methods.md).
    """

    name = "small_cnn3"

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], cfg: ModelConfig):
        super().__init__(num_classes, input_shape, cfg)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64, momentum=cfg.bn_momentum)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn3(self.conv3(super().features(x))), inplace=True)


class SmallCNN4(SmallCNN3):
    """small_cnn3 with a fourth 3x3 convolution (128, batch norm) at quarter resolution; fc over
    its 128 x 7 x 7 maps (at 28x28).

    The added layers run on 7x7 maps, where a convolution costs little on CPU next to the 28x28 and
    14x14 ones. With `method.concat_forward=false` its FlexMatch step costs about what small_cnn3's
    concatenated one does (docs/speed.md). Fashion-MNIST at 100 labels per class, 8,800 steps:
    87.30 +- 0.02 over two label draws against small_cnn3's 87.21 +- 0.25; with 9,600 steps and
    the learning rate decayed to 0, 87.62 +- 0.02 (87.40 +- 0.37 with a third draw) in 34 minutes
    on 2 cores, what configs/fashion_mnist/flexmatch.yaml ships (docs/methods.md#measured).
    """

    name = "small_cnn4"

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], cfg: ModelConfig):
        super().__init__(num_classes, input_shape, cfg)
        _, height, width = image_shape(input_shape, self.name)
        self.conv4 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(128, momentum=cfg.bn_momentum)
        # replaces small_cnn's fc1, built first: the parameters draw from the seed in this order
        self.fc1 = nn.Linear(128 * (height // 4) * (width // 4), 128)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn4(self.conv4(super().features(x))), inplace=True)


class MnistCNN(nn.Module):
    """Seed 001's MNIST network: 5x5 convolutions (20, 40) with 2x2 pooling, Dropout2d, fc 150.

    Differences from the seed: it returns logits (the seed applied ReLU and log-softmax to the
    last layer; a ReLU there clips every negative logit), and `model.dropout` sets both dropouts
    (the seed hard-coded 0.5).
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], cfg: ModelConfig):
        super().__init__()
        channels, height, width = image_shape(input_shape, "mnist_cnn")
        if min(height, width) < 16:
            raise ValueError(f"mnist_cnn needs images of at least 16x16 pixels; got {height}x{width} (use small_cnn)")
        self.conv1 = nn.Conv2d(channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 40, 5)
        self.conv2_drop = nn.Dropout2d(cfg.dropout)
        side_h, side_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(40 * side_h * side_w, 150)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc2 = nn.Linear(150, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.dropout(x))
