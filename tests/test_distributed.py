"""Real two-process runs: `accelerate launch --multi_gpu --num_processes 2` gives 2 gloo ranks on CPU.

Killing, signalling and resuming two-process runs is tested in tests/engine/test_preemption.py.
"""

import subprocess
import sys

import pytest

from tests.conftest import REPO, accelerate_command

pytestmark = pytest.mark.slow


def train_args(shards, out, *extra):
    return ["train", "configs/digits/fixmatch.yaml", f"data.shards={shards}", f"train.output_dir={out}",
            "data.batch_size=20", "data.unlabeled_batch_ratio=2", "train.epochs=4", "train.steps_per_epoch=15",
            "train.log_every_steps=15", "train.keep_last=4", "data.workers=1", *extra]


def launch(shards, out, *extra, **kwargs):
    return subprocess.Popen(accelerate_command(2, *train_args(shards, out, *extra)), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def test_resuming_with_another_process_count_is_one_clear_error(digits_shards, tmp_path):
    run = tmp_path / "run"
    first = launch(digits_shards, run, "train.epochs=1")
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    single = subprocess.run([sys.executable, "-m", "dist_ssl", *train_args(digits_shards, run)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert single.returncode == 2
    assert "dist-ssl: error: cannot resume the stream of" in single.stderr and "read by 2 ranks x 1 workers" in single.stderr
