"""DataLoader worker processes for the streams: how they start (a forkserver), which signals they
obey, and batches that come in one piece per worker, joined in worker order.

`loader(stream, workers)` is what every reader of a stream calls (training, evaluation, pseudo-
labeling); the streams themselves (data/streams.py) make whole batches and know nothing of workers'
processes.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import threading
import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from dist_ssl.data.shards.manifest import DataError


def _worker_init(loader_pid: int, worker_id: int) -> None:
    """Every DataLoader worker: it ends with the process that owns its loader, and obeys only that
    process's signals."""
    threading.Thread(target=_end_with, args=(loader_pid,), name="loader-watch", daemon=True).start()
    _obey_only_the_loader(loader_pid)


def _end_with(loader_pid: int) -> None:
    """Exit when the loader's process is gone. torch's worker watches its parent, which is the
    forkserver here, not the rank: a rank killed outright would leave its workers, and through
    them the forkserver (its children keep it alive), running for ever, holding the rank's memory
    and stdout. A pidfd becomes readable when the process exits (and never names another process
    that reuses the pid); without pidfds (Linux < 5.3), the pid is polled."""
    try:
        fd = os.pidfd_open(loader_pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:
        while True:
            try:
                os.kill(loader_pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(0.5)
    os._exit(0)


def _obey_only_the_loader(loader_pid: int) -> None:
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

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.dataloader)
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


def worker_context():
    """How DataLoader workers start: from a forkserver, not by forking the rank.

    A rank has threads (the run lock's heartbeat, the launcher watchdog, TensorBoard's writer, the
    queue feeders of its other loaders), and forking a process with threads can deadlock the child:
    on CPython 3.11 a child forked while another thread holds the interpreter's thread-list lock
    waits for it forever inside os.fork() (seen here: an evaluation worker stuck in
    `_PyThreadState_DeleteExcept`, its rank waiting for its first batch). The forkserver is one
    single-threaded process per rank, started on first use with the modules a worker needs already
    imported; every worker is forked from it. Where there is no forkserver (macOS, Windows), the
    platform's default."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "dist_ssl.data.streams", "dist_ssl.data.loading", "dist_ssl.data.transforms"])
    return context


def loader(stream: IterableDataset, workers: int) -> Batches:
    """Batches are made inside the stream; the DataLoader only adds worker processes (one iterator
    per loader: an infinite training stream, or one pass of evaluation, so workers never persist)."""
    pieces = getattr(stream, "pieces_per_batch", 1) if workers > 0 else 1
    pin = torch.cuda.is_available()
    return Batches(DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=pin and pieces == 1,
        multiprocessing_context=worker_context() if workers > 0 else None,
        worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers > 0 else None,
        # Its workers' base seed comes from a generator of its own: drawn from the global one when the
        # iterator starts (lazily, at the first batch), it would shift the training RNG (dropout,
        # sampled pseudo-labels) of a resumed run against the uninterrupted one. Samples are seeded
        # by position anyway (collate).
        generator=torch.Generator(),
    ), pieces, getattr(stream, "join", None), pin and pieces > 1)
