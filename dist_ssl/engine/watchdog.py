"""Ranks end with their launcher.

torchrun (and `accelerate launch`, which runs it) starts every rank in a Unix session of its own, so
a signal to the launcher's process group or session never reaches the ranks: after `kill -KILL
-- -PGID` of the launcher they would keep training and committing checkpoints into a folder that a
relaunch then also writes. A rank started by torchrun (`TORCHELASTIC_RUN_ID` set) therefore watches
its parent: when the launcher is gone (the rank has been re-parented), the rank publishes nothing
more (`files.revoke`: a checkpoint commit in flight is refused) and exits at once. Its DataLoader
workers notice their parent is gone and exit too; the run lock it held is stale and the next run
takes it over. The run resumes from the newest checkpoint committed while the launcher lived.

Why not the kernel's parent-death signal (prctl PR_SET_PDEATHSIG): it fires when the *thread* that
forked the child exits, not the parent process, and the launcher is free to start ranks from any
thread; a watched parent pid has no such catch. A rank started without a launcher (`dist-ssl train`
under nohup, srun's tasks) is left alone: its parent may rightly go away.
"""

from __future__ import annotations

import os
import sys
import threading

from dist_ssl import files

POLL_SECONDS = 0.5
EXIT_CODE = 1  # nobody waits for it: the launcher is gone


def _watch(launcher: int) -> None:
    while True:
        threading.Event().wait(POLL_SECONDS)
        if os.getppid() != launcher:
            files.revoke(f"its launcher (pid {launcher}) is gone")
            rank = os.environ.get("RANK", "?")
            try:
                print(f"dist-ssl: [rank {rank}] the launcher (pid {launcher}) is gone: stopping without committing anything more",
                      file=sys.stderr, flush=True)
            except (OSError, ValueError):  # stderr was a pipe to the launcher
                pass
            os._exit(EXIT_CODE)


def install() -> bool:
    """Watch the launcher from a daemon thread, when torchrun started this process."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    launcher = os.getppid()
    files.revoke_when(lambda: f"its launcher (pid {launcher}) is gone" if os.getppid() != launcher else None)
    threading.Thread(target=_watch, args=(launcher,), name="launcher-watchdog", daemon=True).start()
    return True
