"""Accuracy and loss of a network over a whole split, every sample exactly once across ranks."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dist_ssl.data.shards import Manifest
from dist_ssl.data.streams import DEFAULT_MAX_BAD_FRACTION, EvalStream, loader
from dist_ssl.errors import UserError


@torch.no_grad()
def evaluate(net: nn.Module, manifest: Manifest, view, accelerator, batch_size: int, workers: int = 0,
             max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> dict:
    """Sums are reduced over ranks, so a rank with no samples contributes zeros and never blocks."""
    was_training = net.training
    net.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, count
    stream = EvalStream(manifest, batch_size, view, accelerator.process_index, accelerator.num_processes, max_bad_fraction)
    try:
        for batch in loader(stream, min(workers, len(stream.my_units()))):
            labels = batch["label"].to(accelerator.device)
            if (labels < 0).any():
                raise UserError(f"split {manifest.root} has samples without a label (key {batch['keys'][0]}); evaluate on a labeled split")
            with accelerator.autocast():
                logits = net(batch["inputs"]["plain"].to(accelerator.device))
            totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            totals[1] += (logits.argmax(dim=1) == labels).sum()
            totals[2] += len(labels)
    finally:
        net.train(was_training)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, "sum")
    loss_sum, correct, count = totals.tolist()
    if count == 0:
        raise UserError(f"split {manifest.root} is empty")
    # exactly once: whatever the manifest lists and was not evaluated was skipped as corrupt
    return {"accuracy": correct / count, "loss": loss_sum / count, "samples": int(count), "corrupt_samples": manifest.num_samples - int(count)}


def _network_state(folder, meta: dict, weights: str) -> tuple[dict, str]:
    """The evaluated network's weights in a committed checkpoint folder: its EMA (when it has one and
    `weights` is auto or ema) or its raw weights."""
    from dist_ssl.engine import checkpoint

    models = checkpoint.load_file(folder / "model.pt")
    role = meta["eval_role"]
    use_ema = weights == "ema" or (weights == "auto" and role in models["emas"])
    if use_ema and role not in models["emas"]:
        raise UserError(f"checkpoint {folder} has no EMA weights; use --weights raw")
    if use_ema:  # AveragedModel's state: 'module.'-prefixed weights plus n_averaged
        return {k.removeprefix("module."): v for k, v in models["emas"][role].items() if k.startswith("module.")}, "ema"
    return models["nets"][role], "raw"


def evaluated_weights(path: str, model: str, num_classes: int, input_shape: list[int]) -> dict:
    """What `train.init_from` loads: the evaluated network of a checkpoint (its EMA when it has one),
    refused with a clear error when it is another model or was trained for other classes or inputs."""
    from dist_ssl.engine import checkpoint

    folder = checkpoint.resolve(path)
    meta = checkpoint.check_ours(folder)
    theirs = (meta["model"], meta["num_classes"], meta["input_shape"])
    if theirs != (model, num_classes, input_shape):
        raise UserError(
            f"train.init_from={path}: that checkpoint holds {theirs[0]} for {theirs[1]} classes and inputs {theirs[2]}, "
            f"this run trains {model} for {num_classes} classes and inputs {input_shape}"
        )
    return _network_state(folder, meta, "auto")[0]


def evaluate_checkpoint(path: str, shards: str, split: str = "test", batch_size: int = 256, weights: str = "auto") -> dict:
    """Evaluate a committed checkpoint (step-N folder or run folder) on a split of `shards`."""
    from pathlib import Path

    import yaml

    from dist_ssl.config import config_from_dict, role_model
    from dist_ssl.data.shards import load_manifest
    from dist_ssl.data.transforms import build_views
    from dist_ssl.engine import checkpoint
    from dist_ssl.engine.accelerator import make_accelerator
    from dist_ssl.models import build_model

    folder = checkpoint.resolve(path)
    meta = checkpoint.check_ours(folder)
    cfg = config_from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
    root = Path(shards)
    manifest = load_manifest(root if (root / "manifest.json").is_file() else root / split)
    if manifest.num_classes != meta["num_classes"] or list(manifest.input_shape) != meta["input_shape"]:
        raise UserError(
            f"{manifest.root} ({manifest.num_classes} classes, input {list(manifest.input_shape)}) does not match the "
            f"checkpoint ({meta['num_classes']} classes, input {meta['input_shape']})"
        )
    state, used = _network_state(folder, meta, weights)
    net = build_model(role_model(cfg, meta["eval_role"]), meta["num_classes"], tuple(meta["input_shape"]))
    net.load_state_dict(state)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    net.to(accelerator.device)
    # The training split's normalization, not the evaluated split's: the model was trained with it.
    views = build_views(manifest.kind, manifest.input_shape, meta["mean"], meta["std"], cfg.data.augment)
    result = evaluate(net, manifest, views["plain"], accelerator, batch_size, max_bad_fraction=cfg.data.max_bad_fraction)
    return dict(result, checkpoint=str(folder), step=meta["step"], weights=used, split=str(manifest.root))
