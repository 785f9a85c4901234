"""Durable writes on disks that refuse them: a read-only and a full filesystem (real tmpfs mounts in
a private mount namespace, so nothing outlives the test), and what they leave for the next run."""

import os
import subprocess
import sys

import pytest

from dist_ssl import files
from dist_ssl.engine import checkpoint
from tests.conftest import REPO


def private_mounts(script: str, *args: str) -> subprocess.CompletedProcess:
    """`sh -c script` in a mount namespace of its own (as root, or as a user namespace's root)."""
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    return subprocess.run([*unshare, "sh", "-c", script, "sh", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory):
    probe = private_mounts('mount -t tmpfs -o size=64k tmpfs "$1"', str(tmp_path_factory.mktemp("probe")))
    if probe.returncode != 0:
        pytest.skip(f"no private tmpfs mounts here (unshare/mount: {probe.stderr.strip()[:200]})")


def train_command(shards, out) -> str:
    return (f"{sys.executable} -m dist_ssl train configs/digits/supervised.yaml data.shards={shards} train.output_dir={out} "
            "train.epochs=2 train.steps_per_epoch=15 train.checkpoint_every_steps=2 train.keep_last=100")


def test_a_read_only_output_disk_is_one_line_and_exit_2(digits_shards, tmp_path, can_mount):
    disk = tmp_path / "disk"
    disk.mkdir()
    done = private_mounts(f'mount -t tmpfs -o ro,size=1m tmpfs "$1" && {train_command(digits_shards, disk / "run")}', str(disk))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"dist-ssl: error: cannot write {disk / 'run'}: Read-only file system"]


def test_a_disk_filling_up_while_checkpointing_leaves_the_last_committed_checkpoint_to_resume(digits_shards, tmp_path, can_mount):
    """1.2 MB fill up after a few checkpoints: one line, exit 2, no partial step folder; with room
    again, the same command resumes from the newest checkpoint committed before."""
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    run = disk / "run"
    script = f'''
        mount -t tmpfs -o size=1200k tmpfs "$1" || exit 99
        {train_command(digits_shards, run)} > "$2/full.out" 2> "$2/full.err"; echo $? > "$2/full.rc"
        cp -a "$1/run" "$2/after-full"
        mount -o remount,size=20m "$1"
        {train_command(digits_shards, run)} > "$2/again.out" 2>&1; echo $? > "$2/again.rc"
    '''
    kept.mkdir()
    done = private_mounts(script, str(disk), str(kept))
    assert done.returncode == 0, done.stderr
    rc, err = int((kept / "full.rc").read_text()), (kept / "full.err").read_text()
    assert rc == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"dist-ssl: error: cannot write {run / 'checkpoints'}/step-") and line.endswith(": No space left on device"), line
    folders = sorted((kept / "after-full" / "checkpoints").iterdir())
    assert folders and all((f / checkpoint.MARKER).is_file() for f in folders), [f.name for f in folders]  # no partial step-N
    assert not list((kept / "after-full").rglob("*.tmp*"))
    newest = checkpoint.latest(kept / "after-full" / "checkpoints").name
    again = (kept / "again.out").read_text()
    assert int((kept / "again.rc").read_text()) == 0, again
    assert f"resumed from {run / 'checkpoints' / newest} at step {newest.removeprefix('step-')}" in again


def test_a_refused_write_names_the_target_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """What torch.save makes of ENOSPC (a RuntimeError about 'unexpected pos') is traced to its OSError."""
    import errno

    import torch

    def full_disk(handle):
        class Full:
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def flush(self):
                pass

        torch.save(torch.zeros(100_000), Full())

    with pytest.raises(files.CannotWrite, match=f"^cannot write {tmp_path / 'model.pt'}: No space left on device$"):
        files.atomic_write(tmp_path / "model.pt", full_disk)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_ranks_agree_on_a_full_disk_and_leave_no_partial_checkpoint(digits_shards, tmp_path, can_mount):
    """A rank that cannot write its part makes every rank stop at the same checkpoint, and rank 0
    remove the partial folder (no rank waits forever at a barrier for a file that never comes)."""
    from tests.conftest import accelerate_command

    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    kept.mkdir()
    launch = " ".join(accelerate_command(2, *train_command(digits_shards, disk / "run").split()[3:]))
    script = f'''
        mount -t tmpfs -o size=1200k tmpfs "$1" || exit 99
        {launch} > "$2/out" 2>&1; echo $? > "$2/rc"
        cp -a "$1/run" "$2/run"
    '''
    done = private_mounts(script, str(disk), str(kept))
    assert done.returncode == 0, done.stderr
    out = (kept / "out").read_text()
    assert int((kept / "rc").read_text()) == 1, out  # torchrun's verdict on a rank's exit 2
    lines = [line for line in out.splitlines() if line.startswith("dist-ssl:")]
    assert len(lines) == 1 and "cannot write" in lines[0] and lines[0].endswith("No space left on device"), out
    folders = sorted((kept / "run" / "checkpoints").iterdir())
    assert folders and all((f / checkpoint.MARKER).is_file() for f in folders), [f.name for f in folders]


def test_a_refused_lock_file_is_one_line_and_exit_2_where_nothing_can_be_mounted(digits_shards, tmp_path, monkeypatch, capsys):
    """The same verdict as on the read-only tmpfs above, for machines where mounting is not allowed:
    the disk refuses the lock file, the first file a command writes in its folder."""
    import errno

    from dist_ssl import cli

    run = tmp_path / "run"
    real_open = os.open

    def read_only_below_run(path, flags, *args, **kwargs):
        if str(path).startswith(str(run)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_below_run)
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", str(REPO / "configs" / "digits" / "supervised.yaml"), f"data.shards={digits_shards}", f"train.output_dir={run}"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"dist-ssl: error: cannot write {run / 'dist-ssl.lock'}: Read-only file system"]
    assert not run.exists()  # made for the lock, removed with it
