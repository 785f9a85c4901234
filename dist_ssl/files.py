"""Durable writes for every file another process or a later run trusts: shard manifests,
checkpoints, pseudo-label outputs, results. Write a temporary sibling, fsync it, rename it into
place, fsync the folder: a reader sees the old file or the whole new one, never a part.

A write that the disk refuses (read-only, full, over quota, no permission) is a `CannotWrite`: one
line `cannot write PATH: REASON`, exit 2, and no temporary file left behind. A process that no longer
owns its run (the run lock was taken over, the launcher died: `revoke`) publishes nothing more. A
process killed mid-write leaves `NAME.tmpPID`: the next command to take the folder's run lock
removes it (`remove_leftovers`).

Fault injection (`benchmarks/chaos.py`, tests): with `DIST_SSL_DIE_WRITING=GLOB@N` (or
`GLOB@N:RANK`) in its environment, a process SIGKILLs itself half-way through its N-th write of a
file whose name matches GLOB (on that rank only): the real write path, dying at the worst moment."""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from dist_ssl.errors import UserError

_revoked: str | None = None  # why this process may no longer publish files (engine/lock.py, engine/watchdog.py)
_still_owner: list[Callable[[], str | None]] = []  # asked before each publish: a reason to refuse, or None


class CannotWrite(UserError):
    """The output folder refuses a write: a read-only or full disk, a quota, missing permission."""


class Revoked(UserError):
    """This process lost the right to write its run folder; nothing it still has is published."""


def revoke(reason: str) -> None:
    """From now on every `atomic_write` of this process refuses to publish (why: `reason`)."""
    global _revoked
    _revoked = reason


def revoke_when(check: Callable[[], str | None]) -> None:
    """Also ask `check()` right before each publish (is the launcher still there, is the run lock still
    ours): the threads that act on these poll, this closes the gap between two polls."""
    _still_owner.append(check)


def stop_asking(check: Callable[[], str | None]) -> None:
    if check in _still_owner:
        _still_owner.remove(check)


def revoked() -> str | None:
    for check in _still_owner:
        reason = check()
        if reason is not None:
            revoke(reason)
    return _revoked


def os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: torch.save's zip writer turns a failed write (ENOSPC) into
    `RuntimeError: ... unexpected pos`, with the OSError only as its context."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn the disk refusing a write below `path` into one clear CannotWrite."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        error = os_error(exc)
        if error is None:
            raise
        name = error.filename if error.filename and not str(error.filename).startswith(f"{path}.") else path  # not a temporary name
        raise CannotWrite(f"cannot write {name}: {error.strerror or error}") from exc


def fsync_dir(path: Path) -> None:
    """Make the renames in a folder durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DIE_WRITING = "DIST_SSL_DIE_WRITING"
_writes_matched = 0


def _dies_writing(path: Path) -> bool:
    """Whether this write is the one `DIST_SSL_DIE_WRITING` names (see the module's docstring)."""
    global _writes_matched
    spec = os.environ.get(DIE_WRITING)
    if not spec:
        return False
    pattern, _, which = spec.rpartition("@")
    nth, _, rank = which.partition(":")
    if (rank and rank != os.environ.get("RANK", "0")) or not fnmatch.fnmatch(path.name, pattern):
        return False
    _writes_matched += 1
    return _writes_matched == int(nth)


def _write_half_and_die(handle, write: Callable) -> None:
    buffer = io.BytesIO()
    write(buffer)
    handle.write(buffer.getvalue()[: buffer.tell() // 2])
    handle.flush()
    os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: Path, write: Callable) -> None:
    """`write(handle)` into `path` atomically (binary handle). The temporary name carries the pid, so
    processes writing the same path never share one; a crash leaves a `NAME.tmpPID` file behind."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            if _dies_writing(path):
                _write_half_and_die(handle, write)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if revoked() is not None:
            raise Revoked(f"not writing {path}: {_revoked}")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        error = os_error(exc) if isinstance(exc, Exception) and not isinstance(exc, UserError) else None
        if error is not None:  # the target's name, not the temporary one's
            raise CannotWrite(f"cannot write {path}: {error.strerror or error}") from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda handle: handle.write(json.dumps(data, indent=1).encode()))


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle))


_LEFTOVER = re.compile(r"\.tmp\d+$")


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the `NAME.tmpPID` files that writes killed mid-way left under `folder`; returns them.
    Only for the holder of the folder's run lock, before it writes: nobody else writes there."""
    removed = []
    for path in Path(folder).rglob("*.tmp*"):
        if _LEFTOVER.search(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
