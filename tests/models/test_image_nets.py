"""The seed experiments' networks: WideResNet-28-2/-8 (MPL, SMPL), DenseNet-121 (seed 000), ResNet-50 (seed 004)."""

import pytest
import torch
from torch import nn

from dist_ssl.config import ModelConfig
from dist_ssl.errors import UserError
from dist_ssl.models import build_model


def parameters(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name, millions", [("wide_resnet28_2", 1.47), ("wide_resnet28_8", 23.35)])
def test_wide_resnets_have_the_published_sizes(name, millions):
    net = build_model(ModelConfig(name=name), 10, (3, 32, 32))
    assert parameters(net) / 1e6 == pytest.approx(millions, abs=0.01)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["wide_resnet28_2", "densenet121", "resnet50"])
def test_batch_norm_momentum_and_dropout_before_the_classifier_follow_the_config(name):
    net = build_model(ModelConfig(name=name, bn_momentum=0.001, dropout=0.2), 10, (1, 16, 16))
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.momentum == 0.001 for m in norms)
    dropouts = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert [m.p for m in dropouts] == [0.2]
    order = []
    for module in net.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda m, i, o: order.append(m))
    net(torch.randn(3, 1, 16, 16))
    assert isinstance(order[-2], nn.Dropout) and isinstance(order[-1], nn.Linear)  # the last thing before the classifier


@pytest.mark.parametrize("name, stem, side, maps", [
    ("resnet50", "small", 32, 4),      # 32 -> layer4 at stride 8
    ("resnet50", "imagenet", 32, 1),   # 32 -> stem /4 -> layer4 at stride 32
    ("resnet50", "auto", 32, 4),
    ("resnet50", "auto", 96, 3),
    ("densenet121", "small", 32, 4),
    ("densenet121", "imagenet", 32, 1),
])
def test_small_image_stem_keeps_the_resolution(name, stem, side, maps):
    net = build_model(ModelConfig(name=name, stem=stem), 100, (3, side, side))
    features = net.features if name == "densenet121" else nn.Sequential(*list(net.children())[:-2])
    assert features(torch.randn(2, 3, side, side)).shape[-1] == maps
    assert net(torch.randn(2, 3, side, side)).shape == (2, 100)


def test_grey_images_get_a_one_channel_first_convolution():
    for name in ("wide_resnet28_2", "densenet121", "resnet50"):
        net = build_model(ModelConfig(name=name), 10, (1, 28, 28))
        first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
        assert first.in_channels == 1
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_weights_load_across_dropout_settings():
    """A fine-tune runs without dropout on the weights trained with it."""
    for name in ("wide_resnet28_2", "resnet50"):
        trained = build_model(ModelConfig(name=name, dropout=0.2), 10, (3, 32, 32))
        build_model(ModelConfig(name=name, dropout=0.0), 10, (3, 32, 32)).load_state_dict(trained.state_dict())


def test_too_small_images_are_a_user_error():
    with pytest.raises(UserError, match="at least 8x8"):
        build_model(ModelConfig(name="wide_resnet28_2"), 10, (1, 4, 4))
