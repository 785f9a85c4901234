"""Real two-process runs: `accelerate launch --multi_gpu --num_processes 2` gives 2 gloo ranks on CPU."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from dist_ssl.engine import checkpoint
from tests.conftest import REPO, accelerate_command

pytestmark = pytest.mark.slow


def train_args(shards, out, *extra):
    return ["train", "configs/digits/fixmatch.yaml", f"data.shards={shards}", f"train.output_dir={out}",
            "data.batch_size=20", "data.unlabeled_batch_ratio=2", "train.epochs=4", "train.steps_per_epoch=15",
            "train.log_every_steps=15", "train.keep_last=4", "data.workers=1", *extra]


def launch(shards, out, *extra, **kwargs):
    return subprocess.Popen(accelerate_command(2, *train_args(shards, out, *extra)), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def kill_tree(pid):
    """SIGKILL the launcher and every rank at once (torchrun starts ranks in sessions of their own,
    so killing the launcher's process group would leave them running)."""
    import psutil

    parent = psutil.Process(pid)
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def final_model(run):
    return checkpoint.load_file(checkpoint.latest(run / "checkpoints") / "model.pt")


def test_two_processes_train_get_killed_resume_and_finish(digits_shards, tmp_path):
    reference = launch(digits_shards, tmp_path / "reference")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    results = json.loads((tmp_path / "reference" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 60

    run = tmp_path / "killed"
    victim = launch(digits_shards, run)
    deadline = time.time() + 600
    while not checkpoint.committed(run / "checkpoints") and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    assert checkpoint.committed(run / "checkpoints"), "no checkpoint was committed"
    kill_tree(victim.pid)
    victim.communicate()
    committed_steps = [s for s, _ in checkpoint.committed(run / "checkpoints")]
    assert committed_steps and max(committed_steps) < 60

    resumed = launch(digits_shards, run)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert f"resumed from {run / 'checkpoints' / f'step-{max(committed_steps)}'}" in out
    assert json.loads((run / "results.json").read_text())["steps"] == 60
    a, b = final_model(tmp_path / "reference"), final_model(run)
    for role in a["nets"]:
        for name in a["nets"][role]:
            assert torch.equal(a["nets"][role][name], b["nets"][role][name]), name
