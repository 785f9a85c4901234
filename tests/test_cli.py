"""Every bad input: one clear error line on stderr and a non-zero exit, through the real CLI."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port, run_cli


def one_error_line(result, expected):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dist-ssl: error: ") and expected in lines[0], lines[0]


def test_missing_shard_folder(tmp_path):
    result = run_cli("train", "configs/digits/supervised.yaml", f"data.shards={tmp_path / 'nowhere'}")
    one_error_line(result, f"shard folder not found: {tmp_path / 'nowhere'}")


def test_unknown_config_key(digits_shards):
    result = run_cli("train", "configs/digits/fixmatch.yaml", f"data.shards={digits_shards}", "train.epoch=3")
    one_error_line(result, "unknown config key 'train.epoch' (did you mean 'train.epochs'?)")


def test_unknown_method(digits_shards):
    result = run_cli("train", "configs/digits/fixmatch.yaml", f"data.shards={digits_shards}", "method.name=mixmatch")
    one_error_line(result, "unknown method 'mixmatch'")


def test_labels_per_class_larger_than_a_class(tmp_path):
    result = run_cli("shards", "write", "digits", "--out", str(tmp_path / "d"), "--labels-per-class", "500")
    one_error_line(result, "--labels-per-class 500 is larger than class '0' has")
    assert not (tmp_path / "d").exists()


def test_checkpoint_folder_that_is_not_ours(tmp_path, digits_shards):
    (tmp_path / "model.ckpt").write_bytes(b"\x00" * 64)
    result = run_cli("evaluate", str(tmp_path), "--shards", str(digits_shards))
    one_error_line(result, "is not a dist-ssl checkpoint")


def test_missing_config_file_and_bad_arguments():
    one_error_line(run_cli("train", "configs/nope.yaml"), "config file not found: configs/nope.yaml")
    one_error_line(run_cli("shards", "write", "digits"), "the following arguments are required: --out")
    one_error_line(run_cli("shards", "write", "digits", "--out", "x"), "source 'digits' needs --labels-per-class N")
    one_error_line(run_cli("shards", "write", "cifar7", "--out", "x", "--labels-per-class", "1"), "unknown source 'cifar7'")


def test_a_rank_that_left_its_process_group_skips_finalization_but_not_its_exit(tmp_path):
    """cli.run() ends a rank that destroyed its gloo group with os._exit: a gloo worker thread still
    releasing tensors then would abort Python's finalization. Its code, its atexit handlers and its
    buffered output stay those of a normal exit; only finalization (a __del__ here) is skipped."""
    script = f"""
import atexit, sys
import torch.distributed as dist
from dist_ssl import cli

class Finalized:
    def __del__(self, open=open):  # its own reference: builtins may be gone while Python finalizes
        open({str(tmp_path / "finalized")!r}, "w").close()

kept = Finalized()
atexit.register(lambda: open({str(tmp_path / "atexit")!r}, "w").close())
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
print("buffered before the exit")
sys.argv = ["dist-ssl", "train", "configs/nope.yaml"]
cli.run()
"""
    # GLIBC_TUNABLES names the huge-page tunable: run() does not re-execute this script (allocator.py).
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=0"))
    one_error_line(result, "config file not found: configs/nope.yaml")
    assert result.stdout == "buffered before the exit\n"
    assert (tmp_path / "atexit").exists()
    assert not (tmp_path / "finalized").exists()


@pytest.mark.slow
def test_write_train_evaluate(tmp_path):
    written = run_cli("shards", "write", "moons", "--out", str(tmp_path / "moons"), "--labels-per-class", "3", "--seed", "1")
    assert written.returncode == 0, written.stderr
    assert "labeled:       6 samples" in written.stdout
    trained = run_cli("train", "configs/moons/supervised.yaml", f"data.shards={tmp_path / 'moons'}",
                      f"train.output_dir={tmp_path / 'run'}", "train.epochs=2", "train.steps_per_epoch=50")
    assert trained.returncode == 0, trained.stderr
    evaluated = run_cli("evaluate", str(tmp_path / "run"), "--shards", str(tmp_path / "moons"), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stderr.startswith("accuracy ") and "(600 samples, raw weights" in evaluated.stderr
    result = json.loads(evaluated.stdout)  # stdout is the JSON alone
    assert result["samples"] == 600 and sum(map(sum, result["confusion"])) == 600
