"""Stopping on a signal without losing work, and deciding at each step boundary whether to checkpoint.

A cluster announces that it will take the machines away with a signal: SLURM's `--signal=USR1@T`
before the time limit, SIGTERM on preemption or `scancel`, torchrun forwarding the SIGTERM it got.
Once `install()`ed (the `train` command does it first, before importing torch, and keeps it until
the process exits) or inside `catch_signals()`, SIGTERM and SIGUSR1 only set a flag: a signal
during start-up stops the run after its first step, one after the last step changes nothing.

At every step boundary the ranks all-reduce (MAX) that flag together with "the minutes interval has
passed on my clock": one rank receiving the signal is enough, and every rank takes the same
decision at the same step. The run then commits a checkpoint and raises `Preempted`; the command
line exits with `REQUEUE_EXIT_CODE` (75), and running the same command again resumes from it.

A signal sent to a whole process group or cgroup (torchrun and SLURM do that) also reaches the
DataLoader workers, which leave it to the training process (`data/streams.py`).

Inference jobs (`pseudo-label`, `select`) look at the flag after each output shard they publish and
stop taking new ones; at their final barrier `stop_requested()` decides for every rank together, and
they raise `Preempted` instead of publishing. `pipeline` asks the same at every stage boundary and
names the stage in what it raises.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from dist_ssl.config import TrainConfig

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, the same command may succeed later
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received = 0  # the last signal caught; process-wide, as signal handlers are


def _record(signum: int, frame) -> None:
    global _received
    _received = signum


def received() -> int:
    """The signal this process caught since `install()` (or inside `catch_signals()`), or 0."""
    return _received


def install() -> dict:
    """From now on SIGTERM and SIGUSR1 set the stop flag instead of killing the process; returns the
    handlers they had. Only the main thread may set handlers: elsewhere this does nothing."""
    global _received
    _received = 0
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _record) for sig in SIGNALS}


@contextmanager
def catch_signals() -> Iterator[None]:
    """`install()` for the duration of the block (training in-process, e.g. from a notebook or a test)."""
    global _received
    previous = install()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received = 0


class Preempted(Exception):
    """The job stopped on a signal with its work so far committed; the same command resumes it.

    `kept` says what was committed ("at step 8 after committing .../step-8", "after writing 3 of 7
    prediction shards to OUT"); a training job also gives its step and checkpoint; `stage` is the
    pipeline stage it stopped in (set by the pipeline)."""

    def __init__(self, signal_name: str, kept: str, step: int | None = None, checkpoint=None, stage: str | None = None):
        super().__init__(signal_name, kept)
        self.signal_name, self.kept, self.step, self.checkpoint, self.stage = signal_name, kept, step, checkpoint, stage

    def __str__(self) -> str:
        where = f"in stage {self.stage}: " if self.stage else ""
        return f"{where}stopped by {self.signal_name} {self.kept}; run the same command again to resume"

    def marker(self) -> dict:
        """What the PREEMPTED file of the job's folder says (for a requeue wrapper)."""
        record = {"preempted": True}
        if self.stage is not None:
            record["stage"] = self.stage
        if self.step is not None:
            record.update(resumable_at_step=self.step, checkpoint=str(self.checkpoint))
        return dict(record, signal=self.signal_name, exit_code=REQUEUE_EXIT_CODE)


_group = None  # a gloo group for the flag when the default group is not gloo (see StepBoundary)


def stop_requested() -> str | None:
    """Called by every rank at the same point: the name of the signal any rank caught since
    `install()`, or None. One tiny all-reduce when distributed."""
    global _group
    import torch
    import torch.distributed as dist

    signum = _received
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if _group is None and "gloo" not in dist.get_backend():
            _group = dist.new_group(backend="gloo")
        flag = torch.tensor([signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_group)
        signum = int(flag[0])
    return signal.Signals(signum).name if signum else None


@dataclass
class Decision:
    checkpoint: str | None  # why a checkpoint is due after this step: end, signal, epoch, steps, minutes; None = not due
    stop: str | None  # the signal that ends this session after the checkpoint, or None


class StepBoundary:
    """Decides, the same way on every rank, whether to checkpoint and stop after a step."""

    def __init__(self, cfg: TrainConfig, accelerator):
        import torch.distributed as dist  # here, not at the top: `install()` must not wait for torch

        self.cfg = cfg
        self.group = None
        self.distributed = accelerator.num_processes > 1
        if self.distributed and "gloo" not in dist.get_backend():
            # The flags live on the CPU: reducing them over NCCL would cost a copy to the device and a
            # wait for the CUDA stream every step. A gloo group reduces them without touching the GPU.
            self.group = dist.new_group(backend="gloo")
        self.last_checkpoint = time.monotonic()

    def decide(self, done: int) -> Decision:
        """Called by every rank after `done` steps; one tiny all-reduce when distributed."""
        import torch
        import torch.distributed as dist

        cfg = self.cfg
        minutes_due = cfg.checkpoint_every_minutes > 0 and time.monotonic() - self.last_checkpoint >= 60 * cfg.checkpoint_every_minutes
        flags = torch.tensor([_received, int(minutes_due)], dtype=torch.int64)
        if self.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        signum, minutes_due = int(flags[0]), bool(flags[1])
        stop = signal.Signals(signum).name if signum and done < cfg.total_steps else None
        if done == cfg.total_steps:
            reason = "end"
        elif stop:
            reason = "signal"
        elif cfg.checkpoint_every_epochs and done % (cfg.checkpoint_every_epochs * cfg.steps_per_epoch) == 0:
            reason = "epoch"
        elif cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0:
            reason = "steps"
        else:
            reason = "minutes" if minutes_due else None
        if reason is not None:
            self.last_checkpoint = time.monotonic()
        return Decision(reason, stop)
