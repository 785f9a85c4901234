"""How the C library hands memory to a CPU training step.

A WRN-28-2 FixMatch step allocates gigabytes of activations and frees them again, every step. glibc
serves each buffer above 32 MiB with its own mapping, returns it to the kernel when freed, and the
next step page-faults it back in 4 KiB pages, zero-filled: on 2 cores that was a sixth to a third
of the step (benchmarks/train_throughput.py, docs/speed.md). Two remedies, both glibc's own:

* huge pages (every `dist-ssl` command, at start): `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` has
  malloc ask for transparent huge pages, so a buffer faults in 2 MiB at a time (33x fewer faults).
  Peak memory stays that of plain glibc. A tunable is read only when a process starts, hence the
  re-execution; a GLIBC_TUNABLES that already names `glibc.malloc.hugetlb` (`=0` to opt out) is
  left alone.
* keeping freed memory (`train.cpu_allocator=retain`): no buffer goes back to the kernel, so none
  faults again; faster still on 2 cores, at 1.2-1.3x the peak resident memory (fragmentation).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

HUGE_PAGES = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_with_huge_pages() -> bool:
    """glibc 2.35+ (the tunable's first release) on a kernel whose THP is not `never`."""
    libc, version = platform.libc_ver()
    if sys.platform != "linux" or libc != "glibc":
        return False
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
        return (major, minor) >= (2, 35) and "[never]" not in THP_MODE.read_text()
    except (OSError, ValueError):
        return False


def request_huge_pages() -> None:
    """Re-execute this process, once, with glibc's huge-page tunable set. For the entry points
    only (`dist-ssl`, `python -m dist_ssl`), before anything else runs: the process keeps its PID,
    arguments and environment, so launchers (accelerate, torchrun, SLURM) see the same rank."""
    if HUGE_PAGES in os.environ.get("GLIBC_TUNABLES", "") or not sys.executable or not _glibc_with_huge_pages():
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), f"{HUGE_PAGES}=1")))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def huge_pages_requested() -> bool:
    setting = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith(f"{HUGE_PAGES}=")]
    return bool(setting) and setting[-1] != f"{HUGE_PAGES}=0" and _glibc_with_huge_pages()


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing large buffers back to the kernel
    (`train.cpu_allocator=retain`). False where the C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def allocator_facts(retained: bool) -> dict:
    """For results.json: what this process's allocator did."""
    return {"huge_pages": huge_pages_requested(), "retain_freed_memory": retained}
