"""Every shipped config names a method and models that exist, with settings a run accepts."""

from pathlib import Path

import pytest

from dist_ssl.config import load_config, role_model
from dist_ssl.methods import get_method
from dist_ssl.models import MODELS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_shipped_config_is_runnable(path):
    cfg = load_config(path)
    method = get_method(cfg.method.name)
    for role in method.roles:
        assert role_model(cfg, role).name in MODELS
    for name, spec in method.optimizer_specs(cfg).items():
        assert spec.wait_steps < cfg.train.total_steps, name
    if method.unlabeled_views:
        assert cfg.data.unlabeled_batch_ratio >= 1
