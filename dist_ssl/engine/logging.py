"""What a run reports: TensorBoard scalars (rank 0), a progress bar on rank 0 (or progress lines
where stderr is no terminal), one line per epoch.

Step metrics are averaged over the logging window and over ranks (one all-reduce per window), so
the curves do not depend on the number of processes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

# Seconds between two progress lines at most (`Progress`); DIST_SSL_PROGRESS_SECONDS overrides it.
PROGRESS_SECONDS = 30.0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A progress line on stderr every `every` units or every `seconds` seconds, whichever comes
    first: what a bar would show, for logs (nohup, SLURM, `docker run` without -t), where a bar
    prints nothing until the end. The ETA is from the average rate since the start. `seconds`
    defaults to PROGRESS_SECONDS, or DIST_SSL_PROGRESS_SECONDS when set (0: a line at every step)."""

    def __init__(self, label: str, total: int, unit: str = "", every: int | None = None, start: int = 0,
                 seconds: float | None = None):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.seconds = float(os.environ.get("DIST_SSL_PROGRESS_SECONDS", PROGRESS_SECONDS)) if seconds is None else seconds
        self.started = self.last_time = time.monotonic()
        self.start = self.last_done = self.done = start

    def due(self, done: int) -> bool:
        if done <= self.last_done:
            return False
        return (done >= self.total or (self.every is not None and done - self.last_done >= self.every)
                or time.monotonic() - self.last_time >= self.seconds)

    def advance(self, units: int = 1) -> None:
        """After each piece of work: a line with the rate since the last line, when one is due."""
        self.done += units
        if self.due(self.done):
            rate = (self.done - self.last_done) / max(time.monotonic() - self.last_time, 1e-9)
            self.write(self.done, f"{rate:.0f} {self.unit}/s")

    def write(self, done: int, *fields: str) -> None:
        now = time.monotonic()
        speed = (done - self.start) / max(now - self.started, 1e-9)
        eta = _clock((self.total - done) / speed) if speed > 0 else "?"
        unit = f" {self.unit}" if self.unit else ""
        head = f"{self.label} {done}/{self.total}{unit} ({100 * done / max(self.total, 1):.0f}%)"
        print(" | ".join([head, *[f for f in fields if f], f"ETA {eta}"]), file=sys.stderr, flush=True)
        self.last_time, self.last_done = now, done


class RunLogger:
    """Training metrics: window averages over every rank, TensorBoard, progress lines.

    Why not accelerate's trackers: they log what each call is handed, on the main process; a window
    here is summed over ranks in one all-reduce, kept in checkpoints (a resumed run logs the same
    values), and the hparams carry the test accuracy as their metric (the tracker stores hparams
    without one)."""

    def __init__(self, run_dir: Path, accelerator, total_steps: int, start_step: int):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.window: dict[str, list] = {}
        self.ratios: dict[str, torch.Tensor] = {}  # name -> [numerator, denominator] sums
        self.counts: dict[str, torch.Tensor] = {}  # name -> per-class count sums
        self.writer = None
        self.bar = None
        self.progress = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step if start_step else None)
            if sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            else:  # a line at every flush, and between two when a window outlasts the interval
                self.progress = Progress("step", total_steps, start=start_step)

    # Values stay where they are (on the GPU, unsynchronized) until `flush`: a `.cpu()` per step
    # would make the host wait for the device every step.
    def accumulate(self, metrics: dict) -> None:
        for name, value in metrics.items():
            self.window.setdefault(name, []).append(value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64))

    def accumulate_ratio(self, name: str, numerator, denominator) -> None:
        """A ratio of sums (e.g. correct / counted), exact over steps and ranks."""
        pair = torch.stack([torch.as_tensor(numerator), torch.as_tensor(denominator)]).detach().to(torch.float64)
        self.ratios[name] = pair + self.ratios[name].to(pair.device) if name in self.ratios else pair

    def accumulate_counts(self, name: str, counts: torch.Tensor) -> None:
        """Counts per class, summed over the window and ranks; written as `{name}/class_{k}` scalars
        and a `{name}/classes` histogram."""
        counts = counts.detach().to(torch.float64)
        self.counts[name] = counts + self.counts[name].to(counts.device) if name in self.counts else counts

    def flush(self, step: int) -> dict[str, float]:
        """Average the window over steps and ranks; write it to TensorBoard at `step`."""
        names, ratio_names, count_names = sorted(self.window), sorted(self.ratios), sorted(self.counts)
        means = [torch.stack([v.to("cpu", torch.float64) for v in self.window[n]]).mean() for n in names]
        # ratios and counts are sums: one reduce for all of them
        sums = [self.ratios[n].cpu() for n in ratio_names] + [self.counts[n].cpu() for n in count_names]
        if self.accelerator.num_processes > 1:
            device = self.accelerator.device
            if means:
                means = list(self.accelerator.reduce(torch.stack(means).to(device), "mean").cpu())
            if sums:
                sums = list(self.accelerator.reduce(torch.cat(sums).to(device), "sum").cpu().split([len(s) for s in sums]))
        self.window.clear()
        self.ratios.clear()
        self.counts.clear()
        pairs, counts = sums[: len(ratio_names)], sums[len(ratio_names) :]
        averaged = {n: float(v) for n, v in zip(names, means)}
        averaged.update({n: float(p[0] / p[1]) for n, p in zip(ratio_names, pairs) if p[1] > 0})
        if self.writer is not None:
            for name, value in averaged.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            for name, per_class in zip(count_names, counts):
                self._class_counts(name, per_class, step)
        if self.bar is not None and "loss" in averaged:
            self.bar.set_postfix(loss=f"{averaged['loss']:.3f}", refresh=False)
        if self.progress is not None:
            self._progress_line(step, averaged)
        return averaged

    def _class_counts(self, name: str, counts: torch.Tensor, step: int) -> None:
        for k, count in enumerate(counts.tolist()):
            self.writer.add_scalar(f"{name}/class_{k}", count, step)
        classes = torch.arange(len(counts), dtype=torch.float64)
        # one bucket per class: bucket k holds (k - 0.5, k + 0.5]
        self.writer.add_histogram_raw(f"{name}/classes", 0, len(counts) - 1, float(counts.sum()), float((classes * counts).sum()),
                                      float((classes**2 * counts).sum()), (classes + 0.5).tolist(), counts.tolist(), step)

    def progress_due(self, done: int) -> bool:
        """Whether a progress line is due before the window ends (rank 0, stderr no terminal)."""
        return self.progress is not None and self.progress.due(done)

    def progress_line(self, done: int, speed: dict[str, float]) -> None:
        """The line of a window that outlasts the progress interval: its losses so far on this rank
        (rank 0; averaging over ranks would take a collective) and `speed` (images/s, data wait)."""
        means = {n: float(torch.stack([v.to("cpu", torch.float64) for v in values]).mean()) for n, values in self.window.items()}
        self._progress_line(done, dict(means, **speed))

    def _progress_line(self, done: int, values: dict[str, float]) -> None:
        fields = [" ".join(f"{n} {v:.4f}" for n, v in sorted(values.items()) if n.startswith("loss"))]
        if "images_per_second" in values:
            fields += [f"{values['images_per_second']:.0f} images/s", f"data wait {values['data_wait_fraction']:.0%}"]
        self.progress.write(done, *fields)

    def state_dict(self) -> dict:
        """The window not flushed yet: a checkpoint taken between two flushes keeps it, so a resumed
        run logs the same curves as an uninterrupted one."""
        return {"window": {n: torch.stack([v.to("cpu", torch.float64) for v in values]) for n, values in self.window.items()},
                "ratios": {n: pair.cpu() for n, pair in self.ratios.items()},
                "counts": {n: counts.cpu() for n, counts in self.counts.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.window = {n: list(values) for n, values in state["window"].items()}
        self.ratios = dict(state["ratios"])
        self.counts = dict(state.get("counts", {}))  # checkpoints written before class counts were logged

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def image(self, tag: str, figure, step: int) -> None:
        """A matplotlib Figure, rendered to an image."""
        if self.writer is not None:
            self.writer.add_image(tag, render(figure), step, dataformats="HWC")

    def hparams(self, settings: dict, metrics: dict[str, float], step: int) -> None:
        """The run's settings and final metrics for TensorBoard's HParams dashboard, written into the
        run's own folder (SummaryWriter.add_hparams would open a sub-run for them)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(settings, metrics):
            self.writer.file_writer.add_summary(summary, step)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def line(self, text: str) -> None:
        if self.main:
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def flat_settings(tree: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """The scalar leaves of a nested config dict under dotted names (`optim.lr`); lists and unset
    (None) values are left out."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
    return flat


# -- figures (matplotlib's object API: no pyplot state, no display backend) --------------------------


def render(figure):
    """A Figure as an RGB uint8 array [H, W, 3]."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_figure(counts, names: list[str]):
    """Rows: the true class, columns: the predicted one. Colour: the share of the row; text: the count."""
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.asarray(counts, dtype=np.int64)
    n = len(counts)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(3 + 0.4 * n, 16)
    figure = Figure(figsize=(side, side), dpi=100, layout="tight")
    ax = figure.add_subplot()
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:  # beyond, the labels and counts would not fit
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        for i, j in zip(*np.nonzero(counts)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test: {np.trace(counts)} of {counts.sum()} right")
    return figure


def pseudo_label_figure(images: torch.Tensor, predicted, confidence, truth, names: list[str], columns: int = 5):
    """uint8 images [N, C, H, W] in a grid (torchvision's make_grid), each under a caption: the
    pseudo-label and its probability, then the hidden truth; green when they agree, red when not,
    grey when the truth is unknown."""
    from matplotlib.figure import Figure
    from torch.nn import functional as F
    from torchvision.utils import make_grid

    height, width = images.shape[-2:]
    band, pad = max(1, round(0.35 * height)), 1  # the caption band above each image scales with it
    framed = F.pad(images.float() / 255, (0, 0, band, 0), value=1.0)
    grid = make_grid(framed, nrow=columns, padding=pad, pad_value=1.0)
    figure = Figure(figsize=(1.2 * columns, 1.2 * columns * grid.shape[1] / grid.shape[2]), dpi=100)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.axis("off")
    for i, (label, p, true) in enumerate(zip(predicted.tolist(), confidence.tolist(), truth.tolist())):
        row, column = divmod(i, columns)
        x, y = pad + column * (width + pad) + width / 2, pad + row * (height + band + pad) + band / 2
        colour = "grey" if true < 0 else "green" if label == true else "red"
        text = f"{names[label]} {p:.2f}\n(true {names[true] if true >= 0 else '?'})"
        ax.text(x, y, text, ha="center", va="center", fontsize=7, color=colour)
    return figure
