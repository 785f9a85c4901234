"""Every shipped config names a method and models that exist, with settings a run accepts."""

from pathlib import Path

import pytest

from dist_ssl.config import Config, load_config, load_pipeline_config, role_model
from dist_ssl.methods import get_method
from dist_ssl.models import MODELS

ALL = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
CONFIGS = [p for p in ALL if p.parent.name != "pipelines"]
PIPELINES = [p for p in ALL if p.parent.name == "pipelines"]  # `dist-ssl pipeline`: a tree of stage configs


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_shipped_config_is_runnable(path):
    check_runnable(load_config(path))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_shipped_pipeline_stages_are_runnable(path):
    pipeline = load_pipeline_config(path)
    for stage in (pipeline.teacher, pipeline.student, pipeline.finetune):
        check_runnable(stage)


def check_runnable(cfg: Config) -> None:
    method = get_method(cfg.method.name)
    for role in method.roles:
        assert role_model(cfg, role).name in MODELS
    for name, spec in method.optimizer_specs(cfg).items():
        assert spec.wait_steps < cfg.train.total_steps, name
    if method.unlabeled_views:
        assert cfg.data.unlabeled_batch_ratio >= 1
