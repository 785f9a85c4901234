"""Views computed on whole batches, on the training device, with per-sample randomness.

Why: the reference views (`data/transforms.py`) run torchvision v2 on one sample at a time in the
DataLoader workers, about a millisecond per strong view per core. That was 45% of a digits FixMatch
run, and on a GPU node (about 2 cores per GPU) it caps a GPU at ~2k views/s where a WRN-28-2
FixMatch step wants 100k+.

Here a view has three stages:

* `draw()`, in the DataLoader worker, under the sample's own seed (`data.streams.collate` seeds
  torch's default generator per sample and view, as for the reference views): the view's random
  parameters, a handful of integers. The draws replay the reference view's own calls on that
  generator in the same order: RandomCrop's top and left, RandomHorizontalFlip's coin,
  RandAugment's op and sign for each slot, RandomErasing's coin, area, aspect and corner. So a
  sample's batched view *is* its reference view, bit for bit (tests/data/test_device_views.py),
  and switching paths changes no result.
* `plan(params)`, in the worker: the batch's parameters as tensors, with the samples of every
  RandAugment slot sorted into groups of one (op, sign), so the device never waits on the host to
  split a batch.
* `apply(images, plan)`, on the device, on the uint8 batch: crop + flip as one gather, every
  RandAugment group through torchvision's own functional op (a group shares its parameter:
  RandAugment's magnitude is fixed and only the sign is drawn), cutout as one masked fill, then
  the reference normalization. Crop and cutout are our own ops because
  torchvision's take one parameter set per call (one crop place for the whole batch); kornia's and
  torchaug's RandAugment were measured beside ours (`benchmarks/train_throughput.py --sections
  libraries`, docs/speed.md): neither applies parameters drawn elsewhere per sample.

A sample's view depends on (seed, epoch, shard, position) only: not on the batch it is in, the
number of workers or the number of ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from dist_ssl.config import AugmentConfig

# torchvision's RandAugment table: its order decides which op a draw picks, its functions the
# magnitude of each bin. Read from torchvision so the two paths cannot disagree.
_RANDAUGMENT = v2.RandAugment
_OPS = tuple(_RANDAUGMENT._AUGMENTATION_SPACE)


@dataclass(frozen=True)
class _Op:
    name: str
    magnitude: float  # the fixed magnitude of the configured bin (0 for ops without one)
    signed: bool  # a draw decides the sign


class BatchedImageView:
    """`plain`, `weak` (reflect-padded random crop, optional flip) or `strong` (weak + RandAugment +
    cutout) of uint8 CHW images, applied to a batch with each sample's own parameters."""

    def __init__(self, height: int, width: int, pad: int, flip: bool, randaugment_ops: int, magnitude: int,
                 cutout: float, fill: list[int], normalize: Callable[[torch.Tensor], torch.Tensor]):
        if pad >= min(height, width):
            raise ValueError(f"reflect padding of {pad} px needs images larger than {pad} px; got {height}x{width}")
        self.height, self.width, self.pad, self.flip = height, width, pad, flip
        self.randaugment_ops = randaugment_ops
        self.cutout_area = cutout**2
        self.fill = fill
        self.normalize = normalize  # the reference's (a lookup table per level measured 2x slower on CPU)
        self.ops = []
        for name in _OPS:
            magnitudes_fn, signed = _RANDAUGMENT._AUGMENTATION_SPACE[name]
            magnitudes = magnitudes_fn(31, height, width)
            value = 0.0 if magnitudes is None else float(magnitudes[magnitude])
            self.ops.append(_Op(name, value, signed and magnitudes is not None))
        self._randaugment = _RANDAUGMENT(randaugment_ops, magnitude, interpolation=InterpolationMode.NEAREST)
        # Words the reference consumes at most: crop 2, flip 1, 2 per slot, cutout 1 + 10 x 2 + 2.
        self.num_words = (2 if pad else 0) + int(flip) + 2 * randaugment_ops + (23 if cutout > 0 else 0)

    # -- in the worker ---------------------------------------------------------------------------
    def draw(self) -> torch.Tensor | None:
        """The raw random words the reference view would consume from the seeded generator.

        Drawn in one call (one sample costs ~3 us instead of ~50 us for the reference's dozen
        small draws); `plan` decodes them for the whole batch. A 64-bit draw over the full range
        yields two 32-bit words of the generator, high one first, exactly as two 32-bit draws
        would (the range is 2**64 - 1, so one value in 2**64 wraps to 0)."""
        if self.num_words == 0:
            return None
        return torch.randint(-(2**63), 2**63 - 1, ((self.num_words + 1) // 2,))

    def plan(self, draws: list[torch.Tensor | None]) -> dict[str, Any]:
        """The batch's parameters, decoded from its samples' words in the reference's draw order:
        RandomCrop's top and left, RandomHorizontalFlip's coin, RandAugment's op (and sign, for a
        signed op) per slot, RandomErasing's coin, area, aspect (and again while the box does not
        fit, up to 10 times) and corner."""
        n = len(draws)
        plan: dict[str, Any] = {}
        if self.num_words == 0:
            plan["crop"] = torch.zeros(n, 3, dtype=torch.long)
            return plan
        words = _Words(torch.stack(draws))
        span = 2 * self.pad + 1
        top = words.integers(span) if self.pad else np.zeros(n, np.int64)
        left = words.integers(span) if self.pad else np.zeros(n, np.int64)
        flipped = words.uniform() < 0.5 if self.flip else np.zeros(n, bool)  # RandomHorizontalFlip(p=0.5)
        plan["crop"] = torch.from_numpy(np.stack([top, left, flipped.astype(np.int64)], axis=1))
        signed = np.array([op.signed for op in self.ops])
        slots = []
        for _ in range(self.randaugment_ops):
            op = words.integers(len(self.ops))
            negative = np.zeros(n, bool)
            negative[signed[op]] = words.uniform(where=signed[op])[signed[op]] <= 0.5
            slots.append((op, negative))
        if slots:
            plan["slots"], plan["restore"] = self._group(slots)
            plan["choices"] = torch.from_numpy(np.stack([np.stack([op, negative.astype(np.int64)], axis=1) for op, negative in slots], axis=1))
        if self.cutout_area > 0:
            plan["erase"] = torch.from_numpy(self._erase_boxes(words))
        return plan

    def merge(self, plans: list[dict[str, Any]]) -> dict[str, Any]:
        """The plan of the batch that joins the batches of `plans` in order (a rank's pieces from its
        workers): the samples' parameters joined, the RandAugment groups formed anew."""
        plan = {name: torch.cat([p[name] for p in plans]) for name in ("crop", "erase", "choices") if name in plans[0]}
        if "choices" in plan:
            choices = plan["choices"].numpy()
            plan["slots"], plan["restore"] = self._group([(choices[:, k, 0], choices[:, k, 1].astype(bool)) for k in range(choices.shape[1])])
        return plan

    def _group(self, slots: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[dict], torch.Tensor]:
        """Per slot, an order of the (already reordered) batch that makes each (op, sign) one
        contiguous group, and the groups' bounds; then the order that restores the batch."""
        planned = []
        so_far = np.arange(len(slots[0][0]))
        for op, negative in slots:
            key = (op * 2 + negative)[so_far]
            order = np.argsort(key, kind="stable")
            so_far = so_far[order]
            values, starts, counts = np.unique(key[order], return_index=True, return_counts=True)
            groups = [(int(v) // 2, int(v) % 2, int(a), int(a + c)) for v, a, c in zip(values, starts, counts)
                      if self.ops[int(v) // 2].name != "Identity"]
            planned.append({"order": torch.from_numpy(order), "groups": groups})
        return planned, torch.from_numpy(np.argsort(so_far))

    def _erase_boxes(self, words: "_Words") -> np.ndarray:
        """RandomErasing(p=1, scale=(area/4, area), ratio=(1, 1)): a square box, or none (h = w = 0)."""
        n = len(words.cursor)
        words.skip()  # its p=1 coin: drawn, never skips
        boxes = np.zeros((n, 4), np.int64)
        pending = np.ones(n, bool)
        for _ in range(10):
            low = np.float32(self.cutout_area * 0.25)
            erase_area = self.height * self.width * words.uniform(low, np.float32(self.cutout_area), where=pending).astype(np.float64)
            words.skip(where=pending)  # the aspect: exp(uniform(0, 0)) = 1
            side = np.round(np.sqrt(erase_area)).astype(np.int64)
            fits = pending & (side < self.height) & (side < self.width)
            i = words.integers(np.maximum(self.height - side + 1, 1), where=fits)
            j = words.integers(np.maximum(self.width - side + 1, 1), where=fits)
            boxes[fits] = np.stack([i, j, side, side], axis=1)[fits]
            pending &= ~fits
            if not pending.any():
                break
        return boxes

    # -- on the device ---------------------------------------------------------------------------
    def apply(self, images: torch.Tensor, plan: dict[str, Any]) -> torch.Tensor:
        x = crop_and_flip(images, plan["crop"], self.pad)
        for slot in plan.get("slots", ()):
            x = x[slot["order"]]
            for op, negative, start, end in slot["groups"]:
                x[start:end] = self._randaugment_op(x[start:end], op, negative)
        if "restore" in plan:
            x = x[plan["restore"]]
        if "erase" in plan:
            x = cutout(x, plan["erase"], self.fill)
        return self.normalize(x)


    def _randaugment_op(self, x: torch.Tensor, op: int, negative: int) -> torch.Tensor:
        spec = self.ops[op]
        magnitude = -spec.magnitude if negative else spec.magnitude
        # torchvision's own dispatch from op name and magnitude to its functional op (the one
        # RandAugment.forward calls), given a group of samples that share the parameter.
        return self._randaugment._apply_image_or_video_transform(
            x, spec.name, magnitude, interpolation=self._randaugment.interpolation, fill=self._randaugment._fill
        )


class _Words:
    """The 32-bit generator outputs of each sample of a batch, read in order with a cursor per sample.

    torch's CPU generator turns one output `w` into `randint(0, n)` as `w % n` and into a float32
    `uniform_(a, b)` as `(w & (2**24 - 1)) * 2**-24 * (b - a) + a` (ATen's transformation.h)."""

    def __init__(self, draws: torch.Tensor):
        raw = draws.numpy().view(np.uint64)  # int64 v -> the generator's v + 2**63
        raw = raw ^ np.uint64(1 << 63)
        self.words = np.stack([raw >> np.uint64(32), raw & np.uint64(0xFFFFFFFF)], axis=2).reshape(len(draws), -1)
        self.cursor = np.zeros(len(draws), np.int64)
        self.rows = np.arange(len(draws))

    def _next(self, where: np.ndarray | None) -> np.ndarray:
        value = self.words[self.rows, np.minimum(self.cursor, self.words.shape[1] - 1)]
        self.cursor += 1 if where is None else where
        return value

    def skip(self, where: np.ndarray | None = None) -> None:
        self._next(where)

    def integers(self, high, where: np.ndarray | None = None) -> np.ndarray:
        return (self._next(where) % np.asarray(high, np.uint64)).astype(np.int64)

    def uniform(self, low=np.float32(0), high=np.float32(1), where: np.ndarray | None = None) -> np.ndarray:
        unit = (self._next(where) & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2**-24)
        return unit * (np.float32(high) - np.float32(low)) + np.float32(low)


def crop_and_flip(images: torch.Tensor, crop: torch.Tensor, pad: int) -> torch.Tensor:
    """Per sample: reflect-pad by `pad`, crop H x W at (top, left), flip horizontally where asked.

    One gather over the flattened image: the padded image is never built. `crop` is [B, 3] of
    (top, left, flip) as drawn by RandomCrop(padding=pad, padding_mode='reflect') and the flip."""
    b, c, h, w = images.shape
    device = images.device
    crop = crop.to(device)
    rows = _reflect(crop[:, :1] + torch.arange(h, device=device) - pad, h)  # [B, H]
    cols = crop[:, 1:2] + torch.arange(w, device=device)
    cols = torch.where(crop[:, 2:3].bool(), cols.flip(1), cols)  # the flip reads the crop right to left
    cols = _reflect(cols - pad, w)  # [B, W]
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return images.reshape(b, c, h * w).gather(2, index).reshape(b, c, h, w)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """torch's `reflect` padding (the edge pixel is not repeated), for offsets within one side."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def cutout(images: torch.Tensor, boxes: torch.Tensor, fill: list[int]) -> torch.Tensor:
    """Per sample, the box (i, j, h, w) set to `fill` (one value per channel); h = 0 is no box."""
    b, c, h, w = images.shape
    device = images.device
    boxes = boxes.to(device)
    i, j, bh, bw = (boxes[:, k, None] for k in range(4))
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    inside_rows = (rows >= i) & (rows < i + bh)  # [B, H]
    inside_cols = (cols >= j) & (cols < j + bw)  # [B, W]
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]
    value = torch.tensor(fill, dtype=images.dtype, device=device).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
    return torch.where(mask, value, images)


class BatchedVectorView:
    """Vector data: standardization, with the strong view's Gaussian noise drawn per sample in the
    worker (`torch.randn`, as the reference `_jitter`) and added on the device."""

    def __init__(self, shape: tuple[int, ...], noise_scale: torch.Tensor | None, standardize: Callable[[torch.Tensor], torch.Tensor]):
        self.shape, self.noise_scale, self.standardize = shape, noise_scale, standardize

    def draw(self) -> torch.Tensor | None:
        return torch.randn(self.shape) if self.noise_scale is not None else None

    def plan(self, params: list) -> dict[str, Any]:
        return {"noise": torch.stack(params)} if self.noise_scale is not None else {}

    def merge(self, plans: list[dict[str, Any]]) -> dict[str, Any]:
        return {"noise": torch.cat([p["noise"] for p in plans])} if self.noise_scale is not None else {}

    def apply(self, inputs: torch.Tensor, plan: dict[str, Any]) -> torch.Tensor:
        if "noise" in plan:
            inputs = inputs + self.noise_scale.to(inputs.device) * plan["noise"]
        return self.standardize(inputs)


BatchedView = BatchedImageView | BatchedVectorView


def build_batched_views(kind: str, input_shape: tuple[int, ...], mean: list[float], std: list[float], augment: AugmentConfig) -> dict[str, BatchedView]:
    """The batched counterparts of `transforms.build_views` (same names, same views)."""
    from dist_ssl.data.transforms import VIEW_NAMES, normalization, vector_standardization

    if kind == "vector":
        standardize, scale = vector_standardization(mean, std)
        views = {name: BatchedVectorView(tuple(input_shape), None, standardize) for name in VIEW_NAMES}
        if augment.vector_noise > 0:
            views["strong"] = BatchedVectorView(tuple(input_shape), augment.vector_noise * scale, standardize)
        return views
    _, height, width = input_shape
    normalize = normalization(mean, std)
    pad = round(augment.crop_padding * max(height, width))
    fill = [round(m * 255) for m in mean]
    shift = dict(height=height, width=width, pad=pad, flip=augment.flip, fill=fill, normalize=normalize)
    return {
        "plain": BatchedImageView(**dict(shift, pad=0, flip=False), randaugment_ops=0, magnitude=0, cutout=0.0),
        "weak": BatchedImageView(**shift, randaugment_ops=0, magnitude=0, cutout=0.0),
        "strong": BatchedImageView(**shift, randaugment_ops=augment.randaugment_ops,
                                   magnitude=augment.randaugment_magnitude, cutout=augment.cutout),
    }


def to_device(value: Any, device: torch.device) -> Any:
    """A batch's tensors (nested in dicts and lists) on `device`; pinned ones copy asynchronously."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


def on_device(batch: dict, views: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's views, on `device`: the batched views applied there, or the reference views
    (computed in the workers) copied there."""
    if "inputs" in batch:
        return {name: tensor.to(device, non_blocking=True) for name, tensor in batch["inputs"].items()}
    decoded = batch["decoded"].to(device, non_blocking=True)
    return {name: views[name].apply(decoded, to_device(plan, device)) for name, plan in batch["plans"].items()}


class Prefetcher:
    """Batches from a loader, each one's copy to the device issued one step ahead.

    `next()` returns the batch whose copy was issued last time and issues the next one's: on a GPU
    the copy (pinned memory, non_blocking) then runs while the step's kernels do. `waited` adds up
    the seconds spent blocked on the loader, the data-wait of the step."""

    def __init__(self, batches, device: torch.device):
        self.batches = iter(batches)
        self.device = device
        self.waited = 0.0
        self.pending = None

    def _fetch(self) -> dict:
        started = time.perf_counter()
        batch = next(self.batches)
        self.waited += time.perf_counter() - started
        return to_device(batch, self.device) if self.device.type != "cpu" else batch

    def next(self) -> dict:
        batch = self.pending if self.pending is not None else self._fetch()
        self.pending = self._fetch()
        return batch
