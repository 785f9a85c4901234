"""Durable writes for every file another process or a later run trusts: shard manifests,
checkpoints, pseudo-label outputs, results. Write a temporary sibling, fsync it, rename it into
place, fsync the folder: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def fsync_dir(path: Path) -> None:
    """Make the renames in a folder durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable) -> None:
    """`write(handle)` into `path` atomically (binary handle). The temporary name carries the pid, so
    processes writing the same path never share one; a crash leaves a `NAME.tmpPID` file behind."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda handle: handle.write(json.dumps(data, indent=1).encode()))


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle))
