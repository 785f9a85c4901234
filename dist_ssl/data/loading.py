"""DataLoader worker processes for the streams: which signals they obey, and batches that come in
one piece per worker, joined in worker order.

`loader(stream, workers)` is what every reader of a stream calls (training, evaluation, pseudo-
labeling); the streams themselves (data/streams.py) make whole batches and know nothing of workers'
processes.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from dist_ssl.data.shards.manifest import DataError


def _obey_only_the_loader(loader_pid: int, worker_id: int) -> None:
    """SLURM signals every process of a job step and torchrun a rank's whole process group, workers
    included. torch's worker dies on a SIGTERM from anyone but its parent, and the training process
    then fails at once instead of checkpointing at the next step (engine/preemption.py).

    Here SIGTERM and SIGUSR1 are blocked in the worker and a thread takes them with sigwaitinfo,
    which tells who sent them: the SIGTERM of the process that owns the DataLoader (its shutdown)
    ends the worker as before, everyone else's is left to the training process. Programs a worker
    starts inherit the blocked mask (a `pipe:` URL's curl then ends by SIGPIPE or SIGKILL)."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS: keep torch's behaviour
        return
    stop_signals = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo(stop_signals)
            if info.si_signo == signal.SIGTERM and info.si_pid == loader_pid:
                os._exit(0)  # what torch's own handler does for its parent

    threading.Thread(target=wait, name="stop-signals", daemon=True).start()


class Batches:
    """A DataLoader's batches, with a DataError found in a worker raised here as the same one-line
    error (DataLoader itself would re-raise it wrapped in a multi-line traceback text). A training
    stream's batch comes in one piece per worker (`TrainStream.join`), in worker order: DataLoader
    takes the workers' items round-robin, starting from worker 0 in every new iterator."""

    def __init__(self, dataloader: DataLoader, pieces: int = 1, join=None, pin: bool = False):
        self.dataloader, self.pieces, self.join, self.pin = dataloader, pieces, join, pin
        self._started = None

    def start(self) -> "Batches":
        """Fork the workers now (they start reading the first pass) rather than at the first batch."""
        self._started = iter(self.dataloader)
        return self

    def close(self) -> None:
        """End persistent workers now, not whenever the DataLoader is freed."""
        iterator = getattr(self.dataloader, "_iterator", None)
        self.dataloader._iterator = self._started = None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # what torch's own __del__ of the iterator does

    def __iter__(self) -> Iterator[dict]:
        batches = self._started if self._started is not None else iter(self.dataloader)
        self._started = None
        pieces: list[dict] = []
        while (batch := next(batches, None)) is not None:
            if isinstance(batch, dict) and "error" in batch:
                # The worker processes go now, not whenever the traceback that holds this frame is freed.
                del batches
                raise DataError(batch["error"])
            if self.pieces == 1:
                yield batch
                continue
            pieces.append(batch)
            if len(pieces) == self.pieces:
                joined = self.join(pieces)
                pieces = []
                yield _pinned(joined) if self.pin else joined


def _pinned(value):
    """A joined batch in pinned memory (its pieces were not pinned: the copy to the GPU stays asynchronous)."""
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, dict):
        return {k: _pinned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_pinned(v) for v in value]
    return value


def loader(stream: IterableDataset, workers: int, persistent: bool = False) -> Batches:
    """Batches are made inside the stream; the DataLoader only adds worker processes: for one
    iterator (an infinite training stream, one pass of pseudo-labeling), or, `persistent`, for every
    pass of a stream read again and again (evaluations during training), forked once.

    Why fork once: CPython 3.11's child of a fork takes the interpreter's thread-list lock before it
    re-initialises it (PyOS_AfterFork_Child -> _PyThreadState_DeleteExcept), so a fork while another
    thread of the process holds that lock never returns. A training rank has such threads (torch's,
    gloo's, ours); forking evaluation workers at every evaluation hung a rank now and then."""
    pieces = getattr(stream, "pieces_per_batch", 1) if workers > 0 else 1
    pin = torch.cuda.is_available()
    return Batches(DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=persistent and workers > 0,
        pin_memory=pin and pieces == 1,
        worker_init_fn=functools.partial(_obey_only_the_loader, os.getpid()) if workers > 0 else None,
        # Its workers' base seed comes from a generator of its own: drawn from the global one when the
        # iterator starts (lazily, at the first batch), it would shift the training RNG (dropout,
        # sampled pseudo-labels) of a resumed run against the uninterrupted one. Samples are seeded
        # by position anyway (collate).
        generator=torch.Generator(),
    ), pieces, getattr(stream, "join", None), pin and pieces > 1)
