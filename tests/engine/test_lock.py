"""The run lock: one command per output folder, stale locks taken over, a lost lock publishes nothing."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dist_ssl import files
from dist_ssl.engine import lock
from dist_ssl.engine.lock import LOCK, Locked, RunLock, run_lock
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def publishing_allowed(monkeypatch):
    """A test that loses a lock revokes publishing for the whole process: give it back afterwards."""
    monkeypatch.setattr(files, "_revoked", None)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def plant(folder, host, pid, heartbeat_age=0.0):
    """A lock file as another holder left it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    files.atomic_write_json(path, {"host": host, "pid": pid, "pid_started": None, "started": time.time() - 3600, "token": "theirs"})
    then = time.time() - heartbeat_age
    os.utime(path, (then, then))
    return path


def test_a_held_folder_is_refused_naming_the_holder_and_freed_on_release(tmp_path):
    first = RunLock(tmp_path / "run")
    assert first.acquire() is None
    record = json.loads((tmp_path / "run" / LOCK).read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid() and record["started"] <= time.time()
    with pytest.raises(Locked, match=rf"run is in use by another run \(pid {os.getpid()} on {socket.gethostname()}, started .*last heartbeat 0 s ago\)"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run" / LOCK).exists()
    second = RunLock(tmp_path / "run")
    assert second.acquire() is None
    second.release()


def test_stale_locks_are_taken_over_with_a_line_and_live_ones_kept(tmp_path):
    here = socket.gethostname()
    gone = dead_pid()
    plant(tmp_path / "a", here, gone)
    taken = RunLock(tmp_path / "a")
    line = taken.acquire()
    assert f"took over the stale lock {tmp_path / 'a' / LOCK} (pid {gone} on {here}" in line and f"its process {gone} is gone" in line
    assert json.loads((tmp_path / "a" / LOCK).read_text())["token"] == taken.token
    taken.release()

    # Another host: only the heartbeat tells; a fresh one is a live run, an old one a dead one.
    plant(tmp_path / "b", "other-node", 12345, heartbeat_age=lock.STALE_SECONDS / 2)
    with pytest.raises(Locked, match="pid 12345 on other-node"):
        RunLock(tmp_path / "b").acquire()
    assert json.loads((tmp_path / "b" / LOCK).read_text())["token"] == "theirs"  # untouched
    plant(tmp_path / "b", "other-node", 12345, heartbeat_age=lock.STALE_SECONDS + 5)
    line = RunLock(tmp_path / "b").acquire()
    assert "pid 12345 on other-node" in line and "heartbeat is" in line

    # A pid of this host that is alive but is another process now (its start time differs).
    path = plant(tmp_path / "c", here, os.getppid())
    record = json.loads(path.read_text())
    files.atomic_write_json(path, dict(record, pid_started="1"))
    assert "is gone" in RunLock(tmp_path / "c").acquire()

    # A holder that has exited but was not reaped yet (a zombie: its launcher was killed, or reaps
    # later) is gone too; while it runs, its lock is kept.
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        plant(tmp_path / "d", here, holder.pid)
        with pytest.raises(Locked, match=f"pid {holder.pid} on"):
            RunLock(tmp_path / "d").acquire()
        holder.stdin.close()
        while lock._stat(holder.pid)[0] != "Z":  # exited, not yet waited for
            time.sleep(0.01)
        assert "is gone" in RunLock(tmp_path / "d").acquire()
    finally:
        holder.wait()


def test_the_heartbeat_moves_and_a_lost_lock_stops_publishing(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_SECONDS", 0.05)
    held = RunLock(tmp_path / "run")
    held.acquire()
    path = tmp_path / "run" / LOCK
    before = path.stat().st_mtime
    time.sleep(0.3)
    assert path.stat().st_mtime > before
    # Another node judged this one dead and took the lock over: this process must not commit.
    plant(tmp_path / "run", "other-node", 1)
    time.sleep(0.3)
    assert "taken over (now held by pid 1 on other-node" in held.lost
    with pytest.raises(files.Revoked, match="not writing .*COMMITTED: the run lock .* was taken over"):
        files.atomic_write_text(tmp_path / "run" / "COMMITTED", "1\n")
    assert not (tmp_path / "run" / "COMMITTED").exists() and not list((tmp_path / "run").glob("*.tmp*"))
    held.release()
    assert json.loads(path.read_text())["token"] == "theirs"  # not ours to remove


def test_nested_folders_are_covered_by_their_holder_and_refused_to_others(tmp_path):
    with run_lock(tmp_path / "run"):
        with run_lock(tmp_path / "run" / "finetune"):  # the fine-tune stage, in the same process
            assert not (tmp_path / "run" / "finetune" / LOCK).exists()
        # another command on a stage folder of a live run
        proc = subprocess.run([sys.executable, "-c", "import sys; from dist_ssl.engine.lock import RunLock; RunLock(sys.argv[1]).acquire()",
                               str(tmp_path / "run" / "round-1" / "student")], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode != 0 and f"is inside the run {tmp_path / 'run'}, which pid {os.getpid()}" in proc.stderr
    assert not (tmp_path / "run" / LOCK).exists()


def test_two_train_commands_on_one_folder_the_second_refuses_and_touches_nothing(digits_shards, tmp_path):
    """The issue's repro: the same run twice, the second with another learning rate."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "dist_ssl", "train", "configs/digits/supervised.yaml", f"data.shards={digits_shards}",
            f"train.output_dir={run}", "train.epochs=2", "train.steps_per_epoch=10", "train.checkpoint_every_steps=5"]
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (run / LOCK).exists():
        assert first.poll() is None
        time.sleep(0.01)
    # Paused while it holds the lock (alive, as a busy run is), so the first run is surely still
    # running when the second starts, however long that takes, with a run of a few steps.
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run([*args, "optim.lr=0.1"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"dist-ssl: error: {run} is in use by another run (pid {first.pid} on {socket.gethostname()}, started "), line
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert "lr: 0.03" in (run / "config.yaml").read_text()
    assert len(list((run / "tb").iterdir())) == 1 and not (run / LOCK).exists()
    # A lock its holder could not remove (SIGKILL) is taken over by the next run, with a line.
    gone = dead_pid()
    plant(run, socket.gethostname(), gone)
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"dist-ssl: took over the stale lock {run / LOCK} (pid {gone} on" in again.stderr
