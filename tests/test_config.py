import pytest
import yaml

from dist_ssl.config import Config, load_config, load_pipeline_config, save_config, valid_keys
from dist_ssl.errors import UserError


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  steps_per_epoch: 3\noptim:\n  lr: 0.1\n")
    cfg = load_config(path, ["train.epochs=9", "optim.nesterov=false", "model.hidden_sizes=16,4"])
    assert cfg.train.epochs == 9  # override beats YAML
    assert cfg.train.steps_per_epoch == 3  # YAML beats default
    assert cfg.optim.lr == 0.1
    assert cfg.optim.nesterov is False
    assert cfg.model.hidden_sizes == [16, 4]
    assert cfg.data.batch_size == Config().data.batch_size  # default kept


def test_float_overrides_accept_exponents(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "optim.weight_decay=0"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.weight_decay == 0.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
        ("trian.epochs=3", "unknown config key 'trian.epochs' (did you mean 'train.epochs'?)"),
        ("data.augment.cutot=0.1", "did you mean 'data.augment.cutout'?"),
        ("train.epochs=three", "config key 'train.epochs' expects int; got 'three'"),
        ("optim.schedule=linear", "config key 'optim.schedule' must be one of cosine, cosine_7_16, constant"),
        ("train.epochs", "override 'train.epochs' is not of the form key=value"),
        ("train=1", "config key 'train' is a section"),
        ("train.ema_decay=1.5", "config key 'train.ema_decay' must be in [0, 1)"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  fixmatch:\n    treshold: 0.9\n")
    with pytest.raises(UserError, match="unknown config key 'method.fixmatch.treshold' \\(did you mean 'method.fixmatch.threshold'\\?\\)"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "method.name=pseudo_label"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert set(yaml.safe_load((tmp_path / "config.yaml").read_text())) == {"data", "model", "optim", "method", "train", "roles"}


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        if path.parent.name == "bench":  # `dist-ssl bench` protocols: tests/test_shipped_configs.py loads them
            continue
        if path.parent.name == "pipelines":  # `dist-ssl pipeline` configs: a tree of stage configs
            load_pipeline_config(path)
        else:
            load_config(path)


def test_valid_keys_are_dotted_leaves():
    keys = valid_keys()
    assert "train.epochs" in keys and "data.augment.cutout" in keys and "data.augment" not in keys
