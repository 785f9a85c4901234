"""Seed 002's two-moons experiment: test accuracy of every method with a moons config over 10 label
draws, as mean +- std.

    python benchmarks/two_moons.py                       # the table in docs/methods.md (~5 min on 2 cores)
    python benchmarks/two_moons.py --draws 3 --methods mpl smpl --set method.mpl.uda_weight=1
    python benchmarks/two_moons.py --first-draw 100 --methods smpl   # held-out draws: a last check, never tuning

Protocol (seed 002): 2,000 points, 3 labels per class, an MLP with two hidden layers of 8 ReLU
units, learning rate 0.1, 1,000 steps, no augmentation (the configs add noise, and most run 3,000 steps,
SMPL and MPL at lr 0.3: their comments say why). Draw S writes its dataset as
`dist-ssl shards write moons --labels-per-class 3 --seed S` does (S generates the points and picks
the labels; 30% of the points are the test split) and trains every method from
`configs/moons/<method>.yaml`: the same batches and network for all, the budget of each config.

What runs: the methods' own `train_step`, the model registry, the engine's optimizers, schedules and
`Stepper` (what `ctx.optimize` is in `dist-ssl train`), and the engine's `evaluate` on the test
shard. What differs from `dist-ssl train`: batches come from the splits held in memory (each epoch
a fresh permutation of the labeled and the unlabeled split) instead of the shard stream, whose
per-sample tar parsing costs ~1 ms here and would make this table take ~3 hours. The supervised
row matches `dist-ssl train configs/moons/supervised.yaml` exactly (its batch is the whole labeled
split). Threads: 1 (an 8-unit MLP only loses to thread hand-offs).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_ssl.config import load_config, role_model
from dist_ssl.data.shards.manifest import load_manifest
from dist_ssl.data.shards.writer import write_dataset
from dist_ssl.data.sources import load_source
from dist_ssl.data.streams import EvalStream, mix
from dist_ssl.data.transforms import View, build_views
from dist_ssl.engine.accelerator import make_accelerator
from dist_ssl.engine.evaluate import evaluate
from dist_ssl.engine.optim import Stepper, build_optimizer, build_scheduler
from dist_ssl.methods import get_method
from dist_ssl.methods.base import StepContext, TrainBatch
from dist_ssl.models import build_model

METHODS = ("supervised", "pseudo_label", "fixmatch", "freematch", "softmatch", "flexmatch", "mpl", "smpl")
SEED_002 = {"supervised": 76.5, "mpl": 66.0, "smpl": 86.0}


def _as_stored(x: torch.Tensor) -> torch.Tensor:
    return x


def split_tensors(manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of a split as stored (raw coordinates), read once through the evaluation stream."""
    xs, ys = [], []
    for batch in EvalStream(manifest, 4096, View(_as_stored, _as_stored), 0, 1):
        xs.append(batch["inputs"]["plain"])
        ys.append(torch.where(batch["label"] >= 0, batch["label"], batch["truth"]))
    return torch.cat(xs), torch.cat(ys)


class Epochs:
    """Batches of a fixed size from a permutation of the split, a new permutation every epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.cursor = torch.randperm(len(x), generator=self.generator), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        take, count = [], 0
        while count < self.batch_size:
            if self.cursor == len(self.order):
                self.order, self.cursor = torch.randperm(len(self.x), generator=self.generator), 0
            end = min(len(self.order), self.cursor + self.batch_size - count)
            take.append(self.order[self.cursor:end])
            count += end - self.cursor
            self.cursor = end
        index = torch.cat(take)
        return self.x[index], self.y[index]


def train_one(method_name: str, shards: Path, overrides: list[str], accelerator) -> float:
    cfg = load_config(REPO / "configs" / "moons" / f"{method_name}.yaml", [f"data.shards={shards}", *overrides])
    method_cls = get_method(cfg.method.name)
    labeled, unlabeled, test = (load_manifest(shards / split) for split in ("labeled", "unlabeled", "test"))
    torch.manual_seed(cfg.train.seed)
    nets = {role: build_model(role_model(cfg, role), labeled.num_classes, labeled.input_shape) for role in method_cls.roles}
    total = cfg.train.total_steps
    specs = method_cls.optimizer_specs(cfg)
    optimizers = {name: build_optimizer(nets[spec.net], spec.optim) for name, spec in specs.items()}
    schedulers = {name: build_scheduler(optimizers[name], total - spec.wait_steps, spec.optim) for name, spec in specs.items()}
    stepper = Stepper(accelerator, nets, specs, optimizers, schedulers)
    method = method_cls(cfg, nets, labeled.num_classes, unlabeled.num_samples)
    views = build_views(labeled.kind, labeled.input_shape, labeled.data["mean"], labeled.data["std"], cfg.data.augment)
    labeled_batches = Epochs(*split_tensors(labeled), cfg.data.batch_size, mix(cfg.data.seed, 1))
    unlabeled_x = split_tensors(unlabeled)[0]  # in the split's order: a sample's place is its index (FlexMatch)
    unlabeled_batches = Epochs(unlabeled_x, torch.arange(len(unlabeled_x)), cfg.data.batch_size * cfg.data.unlabeled_batch_ratio, mix(cfg.data.seed, 2))
    torch.manual_seed(mix(cfg.train.seed, 1, 0))

    def view(name: str, x: torch.Tensor) -> torch.Tensor:
        # Vector views are elementwise (standardize, Gaussian noise), so one call covers the batch;
        # the stream calls `per_sample` per sample under a per-sample seed.
        return views[name].batch(views[name].per_sample(x))

    for step in range(total):
        x, y = labeled_batches.next()
        batch = TrainBatch(view(method_cls.labeled_view, x), y.long())
        if method_cls.unlabeled_views:
            u, index = unlabeled_batches.next()
            batch.unlabeled = {name: view(name, u) for name in method_cls.unlabeled_views}
            batch.unlabeled_index = index.long()
        stepper.step = step
        method.train_step(batch, StepContext(step, step / cfg.train.steps_per_epoch, total, stepper, stepper.reduce_sum))
    return evaluate(nets[method_cls.eval_role], test, views["plain"], accelerator, 1024)["accuracy"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--first-draw", type=int, default=0, help="draws are seeds N..N+draws-1 (tune on 0..9; 100 and up are held out)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every method")
    parser.add_argument("--shards", type=Path, help="where the draws' datasets go (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    accelerator = make_accelerator()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.shards or Path(tmp)
        draws = []
        seeds = range(args.first_draw, args.first_draw + args.draws)
        for seed in seeds:
            out = root / f"moons-3pc-s{seed}"
            if not (out / "test" / "manifest.json").is_file():
                write_dataset(load_source("moons", seed=seed), out, labels_per_class=3, seed=seed)
            draws.append(out)
        results: dict[str, list[float]] = {}
        for name in args.methods:
            started = time.time()
            results[name] = [train_one(name, shards, args.set, accelerator) for shards in draws]
            print(f"{name:<13} {' '.join(f'{a * 100:5.1f}' for a in results[name])}   ({time.time() - started:.0f} s)", flush=True)
    print(f"\ntwo moons, 3 labels per class, {args.draws} draws (seeds {seeds[0]}..{seeds[-1]}), test accuracy %")
    print(f"{'method':<13}{'mean':>7}{'± std':>8}{'min':>7}{'max':>7}   seed 002")
    for name, accuracies in results.items():
        values = [a * 100 for a in accuracies]
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        print(f"{name:<13}{statistics.mean(values):>7.1f}{std:>8.1f}{min(values):>7.1f}{max(values):>7.1f}   {SEED_002.get(name, '-')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
