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


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """digits, 5 labels per class, 100 samples per shard: 1 labeled, 13 unlabeled, 6 test shards."""
    from dist_ssl.data.shards import write_dataset
    from dist_ssl.data.sources import load_source

    out = tmp_path_factory.mktemp("shards") / "digits"
    write_dataset(load_source("digits"), out, labels_per_class=5, seed=0, maxcount=100)
    return out


def tiny_config(shards: Path, out: Path, method: str = "fixmatch", *overrides: str):
    """A run of a few steps on digits: enough to exercise every part, seconds on 2 cores."""
    return load_config(REPO / "configs" / "digits" / f"{method}.yaml", [
        f"data.shards={shards}", f"train.output_dir={out}", "data.batch_size=20", "data.unlabeled_batch_ratio=2",
        "train.epochs=2", "train.steps_per_epoch=4", "train.log_every_steps=2", *overrides,
    ])


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dist_ssl", *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(processes: int, *args: str) -> list[str]:
    """A real N-process `accelerate launch` (gloo on CPU) on a free port."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
        "--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "dist_ssl", *args,
    ]
