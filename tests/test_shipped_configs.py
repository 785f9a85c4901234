"""Every shipped config names a method and models that exist, with settings a run accepts."""

from pathlib import Path

import pytest
import yaml

from dist_ssl.config import Config, load_config, load_pipeline_config, role_model
from dist_ssl.methods import get_method
from dist_ssl.models import MODELS

ALL = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
CONFIGS = [p for p in ALL if p.parent.name not in ("pipelines", "bench")]
PIPELINES = [p for p in ALL if p.parent.name == "pipelines"]  # `dist-ssl pipeline`: a tree of stage configs
PROTOCOLS = [p for p in ALL if p.parent.name == "bench"]  # `dist-ssl bench`: runs of the configs above


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_shipped_config_is_runnable(path):
    check_runnable(load_config(path))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_shipped_pipeline_stages_are_runnable(path):
    pipeline = load_pipeline_config(path)
    for stage in (pipeline.teacher, pipeline.student, pipeline.finetune):
        check_runnable(stage)


@pytest.mark.parametrize("path", PROTOCOLS, ids=[p.name for p in PROTOCOLS])
def test_shipped_bench_protocols_load(path, monkeypatch):
    from dist_ssl.bench import load_protocol

    repo = Path(__file__).resolve().parents[1]
    protocol = yaml.safe_load(path.read_text())
    monkeypatch.chdir(repo)  # a protocol's config paths are relative to where the bench runs: the checkout
    loaded = load_protocol(path)
    assert list(loaded.methods) == list(protocol["methods"])


def check_runnable(cfg: Config) -> None:
    method = get_method(cfg.method.name)
    for role in method.roles:
        assert role_model(cfg, role).name in MODELS
    for name, spec in method.optimizer_specs(cfg).items():
        assert spec.wait_steps < cfg.train.total_steps, name
    if method.unlabeled_views:
        assert cfg.data.unlabeled_batch_ratio >= 1


@pytest.mark.parametrize("labels, per_class", [("40", 4), ("250", 25), ("4k", 400)])
def test_cifar10_fixmatch_configs_hold_the_papers_settings(labels, per_class):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "cifar10" / f"fixmatch_{labels}.yaml")
    assert (cfg.method.name, cfg.model.name, cfg.data.batch_size, cfg.data.unlabeled_batch_ratio) == ("fixmatch", "wide_resnet28_2", 64, 7)
    assert (cfg.method.fixmatch.threshold, cfg.optim.lr, cfg.optim.schedule, cfg.train.ema_decay) == (0.95, 0.03, "cosine_7_16", 0.999)
    assert cfg.train.total_steps == 2**20 and cfg.data.shards == f"shards/cifar10-{per_class}pc"
