"""Creating the Accelerator the same way for training, evaluation and inference."""

from __future__ import annotations

import os

import torch

from dist_ssl.errors import UserError


def _on_cpu() -> bool:
    cpu = not torch.cuda.is_available()
    if cpu:  # accelerate imports DeepSpeed when installed; spare its "no GPU detected" warning on CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return cpu


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing each large buffer back to the kernel.

    By default every tensor above 32 MiB is its own mapping, returned when freed and zero-filled
    again by page faults when the next step allocates it: a WRN-28-2 FixMatch step on 2 CPU cores
    ran 1.7x slower for it (benchmarks/train_throughput.py, README: Speed). The price is a higher
    resident peak, freed chunks staying in the heap. CPU training only (train.cpu_allocator);
    False where the C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def make_accelerator(mixed_precision: str = "no"):
    from accelerate import Accelerator

    cpu = _on_cpu()
    if cpu and mixed_precision == "fp16":
        raise UserError("mixed precision fp16 needs a GPU; use bf16 or no on CPU")
    # accelerate only forms a gloo group over CPU processes when told it runs on CPU.
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def process_state():
    """accelerate's process control alone (rank, world, device, barriers), for work that trains
    nothing. Unlike an Accelerator it fixes no mixed-precision setting, so a pipeline can run it
    between training stages whatever their `train.mixed_precision`."""
    from accelerate import PartialState

    return PartialState(cpu=_on_cpu())
