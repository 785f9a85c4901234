"""DataLoader workers (data/loading.py) end with their rank."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import REPO


def test_the_workers_of_a_rank_killed_outright_end_with_it(digits_shards):
    """A SIGKILLed rank must not leave its workers running, holding its memory and its stdout (as
    workers started from a forkserver did: their parent is the forkserver). The run below returns
    only once every process holding its stdout is gone."""
    script = f"""
import multiprocessing, os, signal
from dist_ssl.config import AugmentConfig
from dist_ssl.data.loading import loader
from dist_ssl.data.shards.manifest import load_manifest
from dist_ssl.data.streams import TrainStream
from dist_ssl.data.transforms import build_views

manifest = load_manifest({str(digits_shards / 'unlabeled')!r})
views = build_views(manifest.kind, manifest.input_shape, manifest.data["mean"], manifest.data["std"], AugmentConfig())
batches = iter(loader(TrainStream(manifest, 8, {{"weak": views["weak"]}}, 0, 1, 2, 0, 10), 2))
next(batches)
print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    workers = [int(pid) for pid in done.stdout.split()]
    assert len(workers) == 2, done.stdout
    deadline = time.time() + 10
    while any(_alive(pid) for pid in workers):
        assert time.time() < deadline, "workers outlived their rank"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
