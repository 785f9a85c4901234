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
    def __init__(self, run_dir: Path, accelerator, total_steps: int, start_step: int):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.window: dict[str, list] = {}
        self.ratios: dict[str, torch.Tensor] = {}  # name -> [numerator, denominator] sums
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

    def flush(self, step: int) -> dict[str, float]:
        """Average the window over steps and ranks; write it to TensorBoard at `step`."""
        names = sorted(self.window)
        ratio_names = sorted(self.ratios)
        means = [torch.stack([v.to("cpu", torch.float64) for v in self.window[n]]).mean() for n in names]
        pairs = [self.ratios[n].cpu() for n in ratio_names]
        if self.accelerator.num_processes > 1:
            device = self.accelerator.device
            if means:
                means = list(self.accelerator.reduce(torch.stack(means).to(device), "mean").cpu())
            if pairs:
                pairs = list(self.accelerator.reduce(torch.stack(pairs).to(device), "sum").cpu())
        self.window.clear()
        self.ratios.clear()
        averaged = {n: float(v) for n, v in zip(names, means)}
        averaged.update({n: float(p[0] / p[1]) for n, p in zip(ratio_names, pairs) if p[1] > 0})
        if self.writer is not None:
            for name, value in averaged.items():
                self.writer.add_scalar(f"train/{name}", value, step)
        if self.bar is not None and "loss" in averaged:
            self.bar.set_postfix(loss=f"{averaged['loss']:.3f}", refresh=False)
        if self.progress is not None:
            self._progress_line(step, averaged)
        return averaged

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
                "ratios": {n: pair.cpu() for n, pair in self.ratios.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.window = {n: list(values) for n, values in state["window"].items()}
        self.ratios = dict(state["ratios"])

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

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

