"""Shared fixtures: real digits shards written once per session, and helpers to run the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dist_ssl.config import load_config

REPO = Path(__file__).resolve().parents[1]


# The longest test files (seconds, one after another on 2 cores, 2026-12-06) run first: `make test`'s
# two workers take files in this order (--dist loadfile), so neither is left with a long one at the
# end while the other idles. Files not listed follow in their usual order.
LONGEST_FIRST = [
    "tests/engine/test_preemption.py",  # 137
    "tests/test_chaos.py",  # 119
    "tests/engine/test_deepspeed.py",  # 109
    "tests/inference/test_pseudo_label.py",  # 69
    "tests/data/test_training_data.py",  # 60
    "tests/data/test_elastic.py",  # 50
    "tests/data/test_streams.py",  # 49
    "tests/test_bench.py",  # 48
    "tests/test_cli.py",  # 47
    "tests/test_launch.py",  # 42
    "tests/test_pipeline.py",  # 41
]


def pytest_collection_modifyitems(config, items):
    order = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.nodeid.split("::")[0], len(order)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """digits, 5 labels per class, 100 samples per shard: 1 labeled, 13 unlabeled, 6 test shards."""
    from dist_ssl.data.shards.writer import write_dataset
    from dist_ssl.data.sources import load_source

    out = tmp_path_factory.mktemp("shards") / "digits"
    write_dataset(load_source("digits"), out, labels_per_class=5, seed=0, maxcount=100)
    return out


# A run of a few steps on digits: enough to exercise every part, seconds on 2 cores.
TINY = ("data.batch_size=20", "data.unlabeled_batch_ratio=2", "train.epochs=2", "train.steps_per_epoch=4", "train.log_every_steps=2")


def tiny_config(shards: Path, out: Path, method: str = "fixmatch", *overrides: str):
    return load_config(REPO / "configs" / "digits" / f"{method}.yaml", [f"data.shards={shards}", f"train.output_dir={out}", *TINY, *overrides])


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dist_ssl", *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(processes: int, *args: str, entry: tuple[str, ...] = ("-m", "dist_ssl")) -> list[str]:
    """A real N-process `accelerate launch` (gloo on CPU) on a free port; `entry` is what each rank runs."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
        "--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *entry, *args,
    ]


def kill_tree(pid: int, sig: int = 9) -> None:
    """Signal (SIGKILL by default) a launcher and every rank at once: torchrun starts ranks in
    sessions of their own, so signalling the launcher's process group would leave them running."""
    import psutil

    parent = psutil.Process(pid)
    procs = [parent, *parent.children(recursive=True)]
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    if sig == 9:
        # A SIGKILLed rank takes a moment to be gone; until then the run lock rightly counts it as
        # alive, and a rerun started at once would be refused as "in use by another run". Not the
        # launcher: it is the caller's child, and waiting here would reap its exit status.
        psutil.wait_procs(procs[1:], timeout=30)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every file of two step-N folders holds the same state down to the last bit: weights, EMA,
    optimizer and schedule state, counters, each rank's RNG, stream position, method state and
    logging window. Only wall-clock seconds may differ."""
    import torch

    from dist_ssl.engine import checkpoint

    names = sorted(p.name for p in a.glob("*.pt"))
    assert names == sorted(p.name for p in b.glob("*.pt")), (a, b)

    def same(x, y, where):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for key in x:
                if key != "wall_seconds":
                    same(x[key], y[key], f"{where}/{key}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        else:
            assert x == y, f"{where}: {x!r} != {y!r}"

    for name in names:
        same(checkpoint.load_file(a / name), checkpoint.load_file(b / name), name)
