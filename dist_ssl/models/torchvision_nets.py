"""torchvision's DenseNet-121 (seed 000) and ResNet-50 (seed 004), fitted to our inputs.

* `model.stem`: `small` replaces the ImageNet stem (7x7 stride-2 convolution + max-pool, a 4x
  downsampling) with a 3x3 stride-1 convolution and no pooling, as CIFAR versions of these nets do;
  at 32 px the ImageNet stem leaves 8x8 maps before the first block (seed 004 found it hurts). `auto`
  picks `small` for images up to 64 px.
* Any number of input channels (the first convolution is rebuilt for it).
* `model.bn_momentum` on every batch norm, `model.dropout` before the classifier.

Weights start from torchvision's random initialization (no download: pretrained weights are not
this system's business).
"""

from __future__ import annotations

from torch import nn
from torchvision import models

from dist_ssl.config import ModelConfig
from dist_ssl.models.cnn import image_shape


def small_stem(cfg: ModelConfig, height: int, width: int) -> bool:
    return cfg.stem == "small" or (cfg.stem == "auto" and max(height, width) <= 64)


def first_conv(in_channels: int, out_channels: int, small: bool) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False) if small else nn.Conv2d(in_channels, out_channels, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init for these nets
    return conv


def fit(net: nn.Module, cfg: ModelConfig) -> nn.Module:
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = cfg.bn_momentum
    return net


def classifier(linear: nn.Linear, dropout: float) -> nn.Module:
    # Always the same two modules, so weights load across dropout settings (a fine-tune runs without).
    return nn.Sequential(nn.Dropout(dropout), linear)


def resnet50(num_classes: int, input_shape: tuple[int, ...], cfg: ModelConfig) -> nn.Module:
    channels, height, width = image_shape(input_shape, "resnet50")
    net = models.resnet50(weights=None, num_classes=num_classes)
    small = small_stem(cfg, height, width)
    net.conv1 = first_conv(channels, 64, small)
    if small:
        net.maxpool = nn.Identity()
    net.fc = classifier(net.fc, cfg.dropout)
    return fit(net, cfg)


def densenet121(num_classes: int, input_shape: tuple[int, ...], cfg: ModelConfig) -> nn.Module:
    channels, height, width = image_shape(input_shape, "densenet121")
    net = models.densenet121(weights=None, num_classes=num_classes)
    small = small_stem(cfg, height, width)
    net.features.conv0 = first_conv(channels, net.features.conv0.out_channels, small)
    if small:
        net.features.pool0 = nn.Identity()
    net.classifier = classifier(net.classifier, cfg.dropout)
    return fit(net, cfg)
