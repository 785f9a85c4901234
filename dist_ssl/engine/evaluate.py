"""Accuracy and loss of a network over a whole split, every sample exactly once across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from dist_ssl.data.shards.manifest import Manifest
from dist_ssl.data.loading import Batches, loader
from dist_ssl.data.streams import DEFAULT_MAX_BAD_FRACTION, EvalStream
from dist_ssl.data.transforms import View
from dist_ssl.errors import UserError


def eval_batches(manifest: Manifest, view, accelerator, batch_size: int, workers: int = 0,
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, persistent: bool = False) -> Batches:
    """This rank's batches of a split, every pass the same; `persistent` keeps the DataLoader's
    workers between passes (a training run evaluates many times: data/loading.py says why)."""
    stream = EvalStream(manifest, batch_size, view, accelerator.process_index, accelerator.num_processes, max_bad_fraction)
    return loader(stream, min(workers, len(stream.my_units())), persistent)


@torch.no_grad()
def evaluate(net: nn.Module, manifest: Manifest, view, accelerator, batch_size: int, workers: int = 0,
             max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, batches: Batches | None = None) -> dict:
    """Accuracy, loss and the confusion counts (`confusion[true][predicted]`). Sums are reduced
    over ranks, so a rank with no samples contributes zeros and never blocks. `batches` (from
    `eval_batches` of the same split) replaces a DataLoader of its own."""
    was_training = net.training
    net.eval()
    classes = manifest.num_classes
    # loss sum, correct, count, then the confusion counts: one reduce for all of them
    totals = torch.zeros(3 + classes * classes, dtype=torch.float64, device=accelerator.device)
    if batches is None:
        batches = eval_batches(manifest, view, accelerator, batch_size, workers, max_bad_fraction)
    try:
        for batch in batches:
            labels = batch["label"].to(accelerator.device)
            if (labels < 0).any():
                raise UserError(f"split {manifest.root} has samples without a label (key {batch['keys'][0]}); evaluate on a labeled split")
            with accelerator.autocast():
                logits = net(batch["inputs"]["plain"].to(accelerator.device))
            predicted = logits.argmax(dim=1)
            totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            totals[1] += (predicted == labels).sum()
            totals[2] += len(labels)
            totals[3:] += torch.bincount(labels * classes + predicted, minlength=classes * classes)
    finally:
        net.train(was_training)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, "sum")
    loss_sum, correct, count = totals[:3].tolist()
    if count == 0:
        raise UserError(f"split {manifest.root} is empty")
    confusion = totals[3:].long().view(classes, classes).tolist()
    # exactly once: whatever the manifest lists and was not evaluated was skipped as corrupt
    return {"accuracy": correct / count, "loss": loss_sum / count, "samples": int(count), "corrupt_samples": manifest.num_samples - int(count),
            "confusion": confusion}


def first_samples(manifest: Manifest, count: int, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> dict:
    """The first `count` samples of a split as stored (`inputs.plain`: uint8 images), with their
    labels and hidden truth; read in this process, the same ones every time."""
    stored = View(lambda x: x, lambda x: x)
    return next(iter(loader(EvalStream(manifest, count, stored, 0, 1, max_bad_fraction), 0)))


@torch.no_grad()
def predict(net: nn.Module, inputs: torch.Tensor, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, probability) of the most probable class of each input, in eval mode."""
    was_training = net.training
    net.eval()
    try:
        with accelerator.autocast():
            logits = net(inputs.to(accelerator.device))
    finally:
        net.train(was_training)
    confidence, classes = torch.softmax(logits.float(), dim=1).max(dim=1)
    return classes.cpu(), confidence.cpu()


@dataclass
class LoadedNetwork:
    net: nn.Module  # on CPU, in eval mode
    folder: Path  # the committed step-N folder
    meta: dict  # its meta.json
    cfg: object  # the run's Config
    ema: bool  # whether these are EMA weights


def load_network(path: str | Path, weights: str = "auto") -> LoadedNetwork:
    """The evaluated network of a committed checkpoint (step-N folder or run folder)."""
    import yaml

    from dist_ssl.config import config_from_dict, role_model
    from dist_ssl.engine import checkpoint
    from dist_ssl.models import build_model

    folder = checkpoint.resolve(path)
    meta = checkpoint.check_ours(folder)
    cfg = config_from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
    state, ema = checkpoint.network_weights(folder, weights)
    net = build_model(role_model(cfg, meta["eval_role"]), meta["num_classes"], tuple(meta["input_shape"]))
    net.load_state_dict(state)
    return LoadedNetwork(net.eval(), folder, meta, cfg, ema)


def check_matches(manifest: Manifest, meta: dict) -> None:
    if manifest.num_classes != meta["num_classes"] or list(manifest.input_shape) != meta["input_shape"]:
        raise UserError(
            f"{manifest.root} ({manifest.num_classes} classes, input {list(manifest.input_shape)}) does not match the "
            f"checkpoint ({meta['num_classes']} classes, input {meta['input_shape']})"
        )


def evaluate_checkpoint(path: str, shards: str, split: str = "test", batch_size: int = 256, weights: str = "auto",
                        allow_pipe: bool = False) -> dict:
    """Evaluate a committed checkpoint (step-N folder or run folder) on a split of `shards`."""
    from dist_ssl.data.shards.manifest import load_manifest
    from dist_ssl.data.transforms import build_views
    from dist_ssl.engine.accelerator import make_accelerator

    loaded = load_network(path, weights)
    meta = loaded.meta
    root = Path(shards)
    manifest = load_manifest(root if (root / "manifest.json").is_file() else root / split, allow_pipe)
    check_matches(manifest, meta)
    accelerator = make_accelerator(loaded.cfg.train.mixed_precision)
    net = loaded.net.to(accelerator.device)
    # The training split's normalization, not the evaluated split's: the model was trained with it.
    views = build_views(manifest.kind, manifest.input_shape, meta["mean"], meta["std"], loaded.cfg.data.augment)
    result = evaluate(net, manifest, views["plain"], accelerator, batch_size, max_bad_fraction=loaded.cfg.data.max_bad_fraction)
    return dict(result, checkpoint=str(loaded.folder), step=meta["step"], weights="ema" if loaded.ema else "raw", split=str(manifest.root))
