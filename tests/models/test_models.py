import pytest
import torch

from dist_ssl.config import ModelConfig
from dist_ssl.errors import UserError
from dist_ssl.models import MODELS, build_model


@pytest.mark.parametrize(
    "name, shape",
    [("small_cnn", (1, 8, 8)), ("small_cnn", (3, 32, 32)), ("small_cnn3", (1, 8, 8)), ("small_cnn3", (1, 28, 28)), ("small_cnn4", (1, 28, 28)), ("mnist_cnn", (1, 28, 28)), ("mlp", (2,)), ("mlp", (1, 8, 8))],
)
def test_models_give_logits_of_the_right_shape(name, shape):
    model = build_model(ModelConfig(name=name, dropout=0.2), 10, shape)
    assert model(torch.randn(4, *shape)).shape == (4, 10)


def test_mlp_follows_hidden_sizes():
    model = build_model(ModelConfig(name="mlp", hidden_sizes=[8, 8]), 2, (2,))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 8), (8, 8), (8, 2)]


@pytest.mark.parametrize("name, shape, message", [
    ("mnist_cnn", (1, 8, 8), "at least 16x16"),
    ("small_cnn", (2,), "small_cnn needs images"),
    ("small_cnn3", (2,), "small_cnn3 needs images"),
    ("small_cnn4", (2,), "small_cnn4 needs images"),
    ("smal_cnn", (1, 8, 8), "did you mean 'small_cnn'"),
])
def test_model_misfits_are_user_errors(name, shape, message):
    with pytest.raises(UserError, match=message):
        build_model(ModelConfig(name=name), 10, shape)


def test_registry_is_a_plain_dict():
    assert isinstance(MODELS, dict) and set(MODELS) >= {"small_cnn", "mnist_cnn", "mlp"}
