"""The CPU allocator settings a command runs under: huge pages asked for at start (re-executing the
process once), `train.cpu_allocator=retain`, and an explicit GLIBC_TUNABLES left as the user set it."""

import json
import os
import subprocess
import sys

import pytest

from dist_ssl.engine import allocator
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not allocator._glibc_with_huge_pages(), reason="needs glibc 2.35+ and transparent huge pages")


def train_args(shards, out, *overrides):
    return ["train", "configs/digits/fixmatch.yaml", f"data.shards={shards}", f"train.output_dir={out}", "data.batch_size=20",
            "data.unlabeled_batch_ratio=2", "train.epochs=1", "train.steps_per_epoch=2", *overrides]


def cpu_allocator(run_dir):
    return json.loads((run_dir / "results.json").read_text())["launch"]["cpu_allocator"]


def test_a_command_runs_with_huge_pages_and_keeps_its_pid(tmp_path):
    """The re-executed process is the same process: a launcher waiting on the PID sees it end."""
    probe = "import os, sys; from dist_ssl.engine.allocator import request_huge_pages; print(os.getpid(), flush=True); " \
            "request_huge_pages(); print(os.getpid(), os.environ['GLIBC_TUNABLES'], sys.argv[1:])"
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", probe, "an", "argument"], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    first, again, after = done.stdout.splitlines()  # the code ran twice, the second time with the tunable
    assert first == again and after == f"{first} glibc.malloc.hugetlb=1 ['an', 'argument']"


def test_training_records_huge_pages_and_retain(digits_shards, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-m", "dist_ssl", *train_args(digits_shards, tmp_path / "default")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert cpu_allocator(tmp_path / "default") == {"huge_pages": True, "retain_freed_memory": False}
    done = subprocess.run([sys.executable, "-m", "dist_ssl", *train_args(digits_shards, tmp_path / "retain", "train.cpu_allocator=retain")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(env, GLIBC_TUNABLES="glibc.malloc.hugetlb=0"))
    assert done.returncode == 0, done.stderr
    assert cpu_allocator(tmp_path / "retain") == {"huge_pages": False, "retain_freed_memory": True}
