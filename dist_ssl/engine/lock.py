"""One command at a time per output folder: the run lock.

Rank 0 of every command that writes a run folder (`train` with its fine-tune stage, `pipeline` with
all its stages, `pseudo-label`, `select`) holds `OUT/dist-ssl.lock` from before its first write until it
exits. A second command on the same folder, or on a folder inside it (`OUT/finetune`, a pipeline's
`OUT/round-1/student`), refuses with one line naming the holder and touches nothing.

No `flock`/`fcntl`: they are not reliable on every NFS. The protocol uses what NFSv3+ and local
filesystems make atomic:

- take: write the record (host, pid, the pid's start time, when the lock was taken, a random token)
  under a name of one's own, then hard-link it to `dist-ssl.lock`: the link fails when that name
  exists (the lock-file method that holds on NFS, where O_EXCL was not atomic before v3);
- heartbeat: a thread of the holder sets the file's mtime every `HEARTBEAT_SECONDS`, and checks that
  the file still holds its token: if another host took the lock over (this host looked dead, e.g.
  suspended or cut off), the process stops publishing anything (`files.revoke`);
- stale: on the same host, the pid is gone, has exited but not been reaped (a zombie), or now
  belongs to another process (start time differs);
  from another host, the heartbeat is older than `STALE_SECONDS` (the nodes' clocks must agree to
  well within that, as NTP keeps them);
- take over: rename the stale file to a name of one's own, which only one contender can do, check
  that the moved file is the one judged stale, then take the lock as above;
- release: remove the file if it still holds the token.

Once the lock is taken, the temporary files of writes that killed commands left in the folder are
removed (`files.remove_leftovers`): nobody else writes there.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dist_ssl import files
from dist_ssl.errors import UserError

LOCK = "dist-ssl.lock"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0  # from another host: twelve missed heartbeats

_held: set[Path] = set()  # folders this process (any rank) works in under a lock


class Locked(UserError):
    """Another live command holds the folder."""


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); None where /proc is
    missing or the pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a reused pid apart; None
    where /proc is missing."""
    fields = _stat(pid)
    return None if fields is None else fields[19]


def _pid_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    fields = _stat(pid)
    if fields is None:  # no /proc: the signal answered, so it lives
        return True
    # A zombie (Z) or dying (X) holder has exited: only its parent has not read its status yet
    # (a launcher that was itself killed, a test harness that reaps later).
    if fields[0] in ("Z", "X"):
        return False
    return started is None or fields[19] == started


def _read(path: Path) -> dict | None:
    """The holder's record, or None when the file is gone. A file that cannot be parsed (a holder
    killed between create and write) counts as a record without a pid."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError
    except ValueError:
        record = {}
    record["heartbeat"] = mtime
    return record


def describe(record: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    age = time.time() - record["heartbeat"]
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')}, started {started}, last heartbeat {age:.0f} s ago"


def stale_reason(record: dict, now: float | None = None) -> str | None:
    """Why the holder of `record` is gone, or None while it may be alive."""
    now = time.time() if now is None else now
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        if not _pid_alive(record["pid"], record.get("pid_started")):
            return f"its process {record['pid']} is gone"
        return None
    if now - record["heartbeat"] > STALE_SECONDS:
        return f"its heartbeat is {now - record['heartbeat']:.0f} s old (more than {STALE_SECONDS:.0f} s)"
    return None


class RunLock:
    """The lock on one folder, held by this process: `acquire`, then `release` (or use `run_lock`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.token = secrets.token_hex(8)
        self.lost: str | None = None
        self._made: list[Path] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _start_time(os.getpid()),
                "started": time.time(), "token": self.token, "command": " ".join(sys.argv[1:3])}

    def _create(self) -> bool:
        """True when this process now holds the lock. The record is written whole under a name of our
        own, then hard-linked to the lock's name: the link fails when the name exists, so a reader
        never sees a half-written lock (as it could after an O_EXCL create)."""
        mine = self.path.with_name(f"{LOCK}.{self.token}")
        try:
            fd = os.open(mine, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                os.write(fd, json.dumps(self._record(), indent=1).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(mine, self.path)
            except FileExistsError:
                return False
            except OSError:  # NFS may report a retried link as failed: the link count tells
                if os.stat(mine).st_nlink != 2:
                    raise
            files.fsync_dir(self.folder)
            return True
        finally:
            mine.unlink(missing_ok=True)

    def acquire(self) -> str | None:
        """Take the lock; returns a line to print when a stale lock was taken over."""
        try:
            return self._acquire()
        except BaseException:
            self._remove_made_folders()
            raise

    def _acquire(self) -> str | None:
        for outer in self.folder.resolve().parents:
            record = _read(outer / LOCK)
            if record is not None and "token" in record and stale_reason(record) is None:
                raise Locked(f"{self.folder} is inside the run {outer}, which {describe(record)} holds: wait for it, or use another folder")
        with files.writing(self.path):
            # Folders made for the lock alone are removed with it: a command refused for bad input
            # leaves no empty run folder behind.
            self._made = [f for f in [self.folder, *self.folder.parents] if not f.exists()]
            self.folder.mkdir(parents=True, exist_ok=True)
            taken_over = None
            for _ in range(3):  # a contender may take and release it between our steps
                if self._create():
                    break
                record = _read(self.path)
                if record is None:
                    continue
                why = stale_reason(record)
                if why is None:
                    raise Locked(f"{self.folder} is in use by another run ({describe(record)}); "
                                 f"wait for it to end, or remove {self.path} if you know it is gone")
                if self._take_over(record):
                    taken_over = f"took over the stale lock {self.path} ({describe(record)}; {why})"
                    break
            else:
                raise Locked(f"{self.folder}: could not take {self.path}; another run is starting there")
        files.remove_leftovers(self.folder)  # of commands killed mid-write: the folder is ours now
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        files.revoke_when(self._taken_from_us)
        return taken_over

    def _take_over(self, record: dict) -> bool:
        """Move the stale file out of the way and take the lock. Only one contender's rename of the
        file succeeds; a contender that moved a lock someone had taken meanwhile puts it back."""
        moved = self.path.with_name(f"{LOCK}.stale-{self.token}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return self._create()
        judged = record.get("token")
        actual = (_read(moved) or {}).get("token")
        if actual != judged:  # not the file we judged stale: give it back to its holder
            try:
                os.link(moved, self.path)
            except FileExistsError:
                pass
            moved.unlink(missing_ok=True)
            return False
        moved.unlink(missing_ok=True)
        return self._create()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.check()
            if self.lost is not None:
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or read-only disk shows up at the next checkpoint, with its reason

    def _taken_from_us(self) -> str | None:
        """Why the lock is no longer ours, or None; one small read (before each publish, each beat)."""
        record = _read(self.path)
        if record is not None and record.get("token") == self.token:
            return None
        holder = describe(record) if record is not None else "nobody: the file is gone"
        return f"the run lock {self.path} was taken over (now held by {holder})"

    def check(self) -> None:
        """Does the file still hold our token? If not, publish nothing more (files.revoke)."""
        lost = self._taken_from_us()
        if lost is not None:
            self.lost = lost
            files.revoke(lost)

    def release(self) -> None:
        files.stop_asking(self._taken_from_us)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        record = _read(self.path)
        if record is not None and record.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self._remove_made_folders()

    def _remove_made_folders(self) -> None:
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there
                break


def held_over(folder: Path) -> Path | None:
    """The folder this process already holds that contains `folder` (or is it), else None."""
    folder = Path(folder).resolve()
    return next((held for held in _held if folder == held or held in folder.parents), None)


@contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold the lock on `folder` on rank 0 for the block. Every rank learns rank 0's verdict, so a
    refused command exits 2 on every rank rather than leaving ranks waiting for a barrier. Inside a
    folder this process already holds (a fine-tune stage, a pipeline's stages) it does nothing."""
    from dist_ssl.engine.accelerator import on_main, process_state

    folder = Path(folder)
    if held_over(folder) is not None:
        yield
        return
    state = process_state()
    lock = None

    def take():
        nonlocal lock
        candidate = RunLock(folder)
        line = candidate.acquire()
        lock = candidate
        if line:
            print(f"dist-ssl: {line}", file=sys.stderr, flush=True)

    on_main(state, take)
    _held.add(folder.resolve())
    try:
        yield
    finally:
        _held.discard(folder.resolve())
        if lock is not None:
            lock.release()
