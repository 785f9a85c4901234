"""Views of a sample, built from torchvision transforms v2.

`plain` (evaluation and inference), `weak` (random shift, optional flip) and `strong` (weak +
RandAugment + cutout). A view is two parts:

* `per_sample`: random uint8 -> uint8 transforms applied to each sample on its own (v2 transforms
  given a batch would draw one random parameter set for the whole batch, wrong for SSL views);
* `batch`: the deterministic uint8 -> normalized float conversion, applied once to the stacked
  batch (per sample it cost as much as the shift itself).

Vector data (two moons, embeddings) is standardized with the training split's per-feature mean and
std (the SMPL replication standardized its moons too; raw moons coordinates leave an 8-8 ReLU net
near-linear for the protocol's 1,000 steps: 87% test accuracy with every point labeled, instead of
99%). By default every view is the point itself, as in the seed 002 toy protocol;
`augment.vector_noise` gives the strong view Gaussian noise of that many feature standard
deviations, the vector counterpart of RandAugment: consistency between a point and its noisy copy is
what carries labels along a dense region (docs/methods.md: two moons).

Randomness: the stream seeds torch's default generator per sample before calling `per_sample`
(see `data.streams`), so a sample's augmentation depends on (seed, epoch, shard, position) only,
not on worker count, resumption or rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torchvision.transforms import v2

from dist_ssl.config import AugmentConfig

VIEW_NAMES = ("plain", "weak", "strong")


@dataclass(frozen=True)
class View:
    per_sample: Callable[[torch.Tensor], torch.Tensor]
    batch: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        """One sample through both parts (for callers that do not batch)."""
        return self.batch(self.per_sample(sample)[None])[0]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float() - mean.to(x.device)) / std.to(x.device)


def _jitter(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x + scale * torch.randn(x.shape)  # the default generator, seeded per sample by the stream


def vector_standardization(mean: list[float], std: list[float]) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """(standardize, per-feature std) of vector data."""
    scale = torch.tensor(std, dtype=torch.float32)
    return partial(_standardize, mean=torch.tensor(mean, dtype=torch.float32), std=scale), scale


def normalization(mean: list[float], std: list[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images -> normalized float32, on whole batches."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def build_views(kind: str, input_shape: tuple[int, ...], mean: list[float], std: list[float], augment: AugmentConfig | None) -> dict[str, View]:
    if kind == "vector":
        standardize, scale = vector_standardization(mean, std)
        views = {name: View(_identity, standardize) for name in VIEW_NAMES}
        if augment is not None and augment.vector_noise > 0:
            views["strong"] = View(partial(_jitter, scale=augment.vector_noise * scale), standardize)
        return views
    _, height, width = input_shape
    normalize = normalization(mean, std)
    shift: list = []
    pad = round(augment.crop_padding * max(height, width))
    if pad > 0:
        shift.append(v2.RandomCrop((height, width), padding=pad, padding_mode="reflect"))
    if augment.flip:
        shift.append(v2.RandomHorizontalFlip())
    strong = shift + [v2.RandAugment(augment.randaugment_ops, augment.randaugment_magnitude)]
    if augment.cutout > 0:
        # FixMatch's cutout: one square of side up to `cutout * size` at a random place, filled with
        # the mean colour (which normalizes to 0).
        area = augment.cutout**2
        fill = [round(m * 255) for m in mean]
        strong.append(v2.RandomErasing(p=1.0, scale=(area * 0.25, area), ratio=(1.0, 1.0), value=fill))
    return {
        "plain": View(_identity, normalize),
        "weak": View(v2.Compose(shift) if shift else _identity, normalize),
        "strong": View(v2.Compose(strong), normalize),
    }
