"""Wide ResNets (Zagoruyko & Komodakis 2016) as FixMatch and MPL use them: WRN-28-2 for CIFAR-10,
WRN-28-8 for CIFAR-100.

Pre-activation basic blocks with LeakyReLU(0.1), batch norm with `model.bn_momentum` (MPL: 0.001 in
PyTorch's convention, i.e. a 0.999 moving average), and `model.dropout` between the global pooling
and the classifier (MPL's dense dropout, 0.2). Any number of input channels and any image side of at
least 8 px works: the two stride-2 groups are followed by global average pooling.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dist_ssl.config import ModelConfig
from dist_ssl.models.cnn import image_shape


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, bn_momentum: float, activate_shortcut: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = None if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        # The first block of a WRN sees the stem's raw output: its shortcut takes the activated input too.
        self.activate_shortcut = activate_shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.leaky_relu(self.bn1(x), 0.1, inplace=True)  # batch norm's backward does not read its output
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(activated)), 0.1, inplace=True))
        if self.shortcut is None:
            return x + out
        return self.shortcut(activated if self.activate_shortcut else x) + out


class WideResNet(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], cfg: ModelConfig, depth: int = 28, width: int = 2):
        super().__init__()
        channels, height, width_px = image_shape(input_shape, f"wide_resnet{depth}_{width}")
        if min(height, width_px) < 8:
            raise ValueError(f"wide_resnet{depth}_{width} needs images of at least 8x8 pixels; got {height}x{width_px}")
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
        layers = []
        for group, stride in enumerate((1, 2, 2)):
            for i in range(blocks_per_group):
                in_channels = widths[group] if i == 0 else widths[group + 1]
                layers.append(BasicBlock(in_channels, widths[group + 1], stride if i == 0 else 1, cfg.bn_momentum,
                                         activate_shortcut=group == 0 and i == 0))
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[3], momentum=cfg.bn_momentum)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.bn(self.blocks(self.stem(x))), 0.1, inplace=True)
        return self.fc(self.dropout(F.adaptive_avg_pool2d(x, 1).flatten(1)))


class WideResNet28x2(WideResNet):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], cfg: ModelConfig):
        super().__init__(num_classes, input_shape, cfg, depth=28, width=2)


class WideResNet28x8(WideResNet):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], cfg: ModelConfig):
        super().__init__(num_classes, input_shape, cfg, depth=28, width=8)
