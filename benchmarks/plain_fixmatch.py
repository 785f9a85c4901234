"""A plain FixMatch, outside dist-ssl, on dist-ssl's shards: the reference issue 18 measures against.

    python benchmarks/plain_fixmatch.py SHARDS [SHARDS ...] [--steps 1000] [--model cnn3|small_cnn]
        [--strong affine|randaugment] [--schedule cosine|cosine_7_16] [--ema 0.99]

The recipe a practitioner writes in 60 lines, as the issue describes it: a 3-conv batch-norm CNN,
SGD 0.03 with Nesterov momentum and weight decay 5e-4, cosine decay to 0, 64 labeled + 7 x 64
unlabeled images a step, threshold 0.95, a 1-pixel shift as the weak view and affine + brightness +
Gaussian noise + cutout as the strong one; one process, the data in memory, batches drawn with
replacement, the raw model evaluated. Each flag swaps one piece for dist-ssl's choice, so the
difference between this script and `dist-ssl train configs/digits/fixmatch.yaml` can be taken apart
one piece at a time. Prints one line per shards folder, then mean +- sample std.

Measured (this 2-core VM, `--threads 1` beside a `dist-ssl bench`, 320-445 s a run): digits, 5 labels
per class, draws 0-9 of `shards write`, 1,000 steps: 96.28 +- 1.13, against 95.91 +- 1.75 for
dist-ssl's shipped FixMatch on 2 processes; draw by draw -0.37 +- 1.67, no systematic gap
(docs/methods.md, each draw there).

It is a benchmark, deliberately independent of dist-ssl's code paths (only `--model small_cnn`
borrows dist-ssl's network, to test that piece alone).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
import time
from pathlib import Path

import torch
import webdataset as wds
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2


def load_split(folder: Path, labels: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    urls = sorted(glob.glob(str(folder / "*.tar")))
    if not urls:
        raise SystemExit(f"plain_fixmatch: no .tar shards in {folder}")
    channels = json.loads((folder / "manifest.json").read_text())["input"]["shape"][-1]
    decoded = wds.WebDataset(urls, shardshuffle=False).decode("torchl8" if channels == 1 else "torchrgb8")
    samples = list(decoded.to_tuple("png", "cls") if labels else decoded.to_tuple("png"))
    images = torch.stack([sample[0].view(channels, *sample[0].shape[-2:]) for sample in samples])
    return images.float() / 255, torch.tensor([sample[1] for sample in samples]) if labels else None


class CNN3(nn.Module):
    def __init__(self, channels: int, side: int, classes: int):
        super().__init__()
        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*block(channels, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128), nn.MaxPool2d(2))
        self.fc = nn.Linear(128 * (side // 4) ** 2, classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def affine(x: torch.Tensor, max_degrees: float, max_shift: float, scale: tuple[float, float], pixels: bool) -> torch.Tensor:
    """A random affine map per image, the whole batch at once; `pixels` rounds the shift to whole pixels."""
    n, side = x.shape[0], x.shape[-1]
    angle = (torch.rand(n) * 2 - 1) * math.radians(max_degrees)
    zoom = torch.empty(n).uniform_(*scale)
    shift = (torch.rand(n, 2) * 2 - 1) * max_shift
    if pixels:
        shift = torch.round(shift * side) / side
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / zoom, -torch.sin(angle) / zoom
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / zoom, torch.cos(angle) / zoom
    theta[:, :, 2] = shift * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest" if pixels else "bilinear", padding_mode="zeros", align_corners=False)


def cutout(x: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    n, _, h, w = x.shape
    size = max(1, int(h * fraction))
    top, left = torch.randint(0, h - size + 1, (n,)), torch.randint(0, w - size + 1, (n,))
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < top.view(n, 1, 1) + size)
              & (cols >= left.view(n, 1, 1)) & (cols < left.view(n, 1, 1) + size))
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def weak(x):
    return affine(x, 0.0, 1.0 / x.shape[-1], (1.0, 1.0), pixels=True)


def strong_affine(x):
    x = affine(x, 15.0, 0.125, (0.9, 1.1), pixels=False)
    x = x * torch.empty(x.shape[0], 1, 1, 1).uniform_(0.7, 1.3)
    return cutout((x + 0.1 * torch.randn_like(x)).clamp(0, 1))


RANDAUGMENT = v2.RandAugment(num_ops=2, magnitude=5)


def strong_randaugment(x):
    """dist-ssl's strong view on digits: the weak shift, RandAugment(2, 5) per image, cutout 0.5."""
    x = (weak(x) * 255).round().to(torch.uint8)
    return cutout(torch.stack([RANDAUGMENT(image) for image in x]).float() / 255)


def train_once(shards: Path, args) -> float:
    torch.manual_seed(args.seed)
    xl, yl = load_split(shards / "labeled")
    xu, _ = load_split(shards / "unlabeled", labels=False)
    xt, yt = load_split(shards / "test")
    mean, std = xu.mean(), xu.std()
    classes = int(max(yl.max(), yt.max())) + 1
    if args.model == "cnn3":
        model = CNN3(xl.shape[1], xl.shape[-1], classes)
    else:
        from dist_ssl.config import ModelConfig
        from dist_ssl.models.cnn import SmallCNN
        model = SmallCNN(classes, tuple(xl.shape[1:]), ModelConfig(name="small_cnn"))
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    decay = [p for p in model.parameters() if p.ndim > 1]  # weights; not biases or batch-norm scales
    rest = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}], lr=0.03, momentum=0.9, nesterov=True)
    if args.schedule == "cosine":  # to 0 at the last step
        factor = lambda k: 0.5 * (1 + math.cos(math.pi * k / args.steps))
    else:  # FixMatch's cos(7 pi k / 16 K), dist-ssl's `cosine_7_16`: ends at 0.2 of the peak
        factor = lambda k: math.cos(7 * math.pi * k / (16 * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    strong = strong_affine if args.strong == "affine" else strong_randaugment
    norm = lambda x: (x - mean) / std
    model.train()
    for _ in range(args.steps):
        li, ui = torch.randint(0, len(xl), (64,)), torch.randint(0, len(xu), (64 * 7,))
        inputs = torch.cat([weak(xl[li]), weak(xu[ui]), strong(xu[ui])])
        logits = model(norm(inputs))
        labeled, unlabeled_weak, unlabeled_strong = logits[:64], *logits[64:].chunk(2)
        confidence, pseudo = unlabeled_weak.detach().softmax(1).max(1)
        mask = (confidence >= 0.95).float()
        loss = F.cross_entropy(labeled, yl[li]) + (F.cross_entropy(unlabeled_strong, pseudo, reduction="none") * mask).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update_parameters(model)
    evaluated = (ema.module if ema is not None else model).eval()
    with torch.no_grad():
        return (evaluated(norm(xt)).argmax(1) == yt).float().mean().item() * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="+", type=Path, help="folders written by `dist-ssl shards write`")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--model", choices=["cnn3", "small_cnn"], default="cnn3")
    parser.add_argument("--strong", choices=["affine", "randaugment"], default="affine")
    parser.add_argument("--schedule", choices=["cosine", "cosine_7_16"], default="cosine")
    parser.add_argument("--ema", type=float, default=0.0, help="evaluate an EMA of the weights with this decay (0 = the raw model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    accuracies = []
    for shards in args.shards:
        start = time.perf_counter()
        accuracies.append(train_once(shards, args))
        print(f"{shards}: test accuracy {accuracies[-1]:.2f}% ({time.perf_counter() - start:.0f} s)", flush=True)
    spread = f" +- {statistics.stdev(accuracies):.2f}" if len(accuracies) > 1 else ""
    print(f"plain fixmatch {vars(args) | {'shards': len(args.shards)}}: {statistics.mean(accuracies):.2f}{spread}")


if __name__ == "__main__":
    main()
