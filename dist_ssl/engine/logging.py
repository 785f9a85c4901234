"""What a run reports: TensorBoard scalars (rank 0), a progress bar on rank 0, one line per epoch.

Step metrics are averaged over the logging window and over ranks (one all-reduce per window), so
the curves do not depend on the number of processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


class RunLogger:
    def __init__(self, run_dir: Path, accelerator, total_steps: int, start_step: int):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.window: dict[str, list] = {}
        self.ratios: dict[str, torch.Tensor] = {}  # name -> [numerator, denominator] sums
        self.writer = None
        self.bar = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step if start_step else None)
            if sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

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
        return averaged

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
