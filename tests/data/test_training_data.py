"""The data layer inside real training runs: uneven shards on 2 processes x 2 workers, resuming on
another number of processes or workers, corrupt samples counted into the results, and one-line errors."""

import json
import shutil
import subprocess

import pytest
import torch

from dist_ssl.engine import checkpoint
from tests.conftest import REPO, accelerate_command, run_cli
from tests.data.conftest import corrupt_png, repack, rewrite_shard

pytestmark = pytest.mark.slow

TINY = ["data.batch_size=20", "data.unlabeled_batch_ratio=2", "train.steps_per_epoch=4", "train.log_every_steps=2"]


def train_args(shards, out, *extra):
    return ["train", "configs/digits/fixmatch.yaml", f"data.shards={shards}", f"train.output_dir={out}", *TINY, *extra]


def launch_two(*args, timeout=420):
    return subprocess.run(accelerate_command(2, *args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def uneven(digits_shards, tmp_path):
    """Shards of 0 to 601 samples: an empty shard, fewer shards than readers, a rank whose test shard is empty."""
    shards = shutil.copytree(digits_shards, tmp_path / "uneven")
    repack(shards / "unlabeled", [0, 3, 1, 600, 2, 601])
    repack(shards / "test", [0, 1, 539])  # 2 ranks: rank 0 evaluates the empty shard, rank 1 the rest
    return shards


def test_uneven_shards_on_two_processes_do_not_hang_and_resume_on_one_process(uneven, tmp_path):
    """Two ranks with two workers each over uneven shards finish; the run then resumes on one
    process with one worker (another layout in both) and continues the data."""
    run = tmp_path / "run"
    result = launch_two(*train_args(uneven, run, "train.epochs=2", "data.workers=2"), timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 8
    history = torch.load(checkpoint.latest(run / "checkpoints") / "training.pt", weights_only=True)["state"]["history"]
    assert [h["samples"] for h in history] == [540, 540]  # every test sample, exactly once, on both evaluations

    second = run_cli(*train_args(uneven, run, "train.epochs=3", "data.workers=1"), timeout=400)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resumed from {run / 'checkpoints' / 'step-8'} at step 8 (saved by 2 processes, continuing on 1)" in second.stdout
    final = checkpoint.load_file(checkpoint.latest(run / "checkpoints") / "rank-00000.pt")["streams"]["unlabeled"]
    # the same virtual consumers continued on the new layout: nothing was re-dealt
    assert (final["world"], final["workers"], final["virtual_consumers"], final["base_epoch"]) == (1, 1, 64, 0)
    assert sorted(final["positions"]) == list(range(64))
    assert json.loads((run / "results.json").read_text())["steps"] == 12


def test_corrupt_samples_are_skipped_and_reach_results_and_tensorboard(digits_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards = shutil.copytree(digits_shards, tmp_path / "digits")
    for index in range(13):  # one corrupt image per unlabeled shard
        rewrite_shard(shards / "unlabeled", index, lambda samples: [corrupt_png(s) if i == 3 else s for i, s in enumerate(samples)])
    # 13 corrupt samples in 1,207 (1%); a worker reads 8 shards at a time, so 2 of the first 34 samples
    # it reads can be corrupt (more than 5%): the fraction allowed is 10%
    result = run_cli(*train_args(shards, tmp_path / "run", "train.epochs=2", "data.workers=1", "data.max_bad_fraction=0.1"))
    assert result.returncode == 0, result.stderr
    assert "dist-ssl: warning: skipped corrupt sample" in result.stderr
    corrupt = json.loads((tmp_path / "run" / "results.json").read_text())["corrupt_samples"]
    assert corrupt["labeled"] == 0 and corrupt["unlabeled"] >= 1
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    fractions = [e.value for e in events.Scalars("train/corrupt_fraction_unlabeled")]
    assert 0 < fractions[-1] < 0.1


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_label_during_training_is_one_error_line_naming_the_shard(digits_shards, tmp_path, workers):
    shards = shutil.copytree(digits_shards, tmp_path / "digits")
    rewrite_shard(shards / "labeled", 0, lambda samples: [dict(s, cls=b"11") for s in samples])
    result = run_cli(*train_args(shards, tmp_path / "run", "train.epochs=1", f"data.workers={workers}"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dist-ssl: error: shard {shards / 'labeled' / 'labeled-000000.tar'}: sample ")
    assert lines[0].endswith("has label 11, outside 0..9 (10 classes)")


def test_an_unlabeled_image_folder_joins_a_labeled_dataset(digits_shards, tmp_path):
    """`shards write images` (no classes, no truth) as the unlabeled split of a labeled dataset."""
    from dist_ssl.data.sources import load_source
    from tests.data.conftest import write_png

    digits = load_source("digits")
    for i in range(300):
        write_png(tmp_path / "pool" / f"{i % 7}" / f"{i}.png", digits.train.read(i))
    written = run_cli("shards", "write", "images", "--path", str(tmp_path / "pool"), "--out", str(tmp_path / "pool-shards"),
                      "--maxcount", "64", "--workers", "2")
    assert written.returncode == 0, written.stderr
    assert written.stdout.splitlines() == [f"unlabeled:     300 samples in 5 shard(s) -> {tmp_path / 'pool-shards'}/unlabeled"]
    result = run_cli(*train_args(digits_shards, tmp_path / "run", "train.epochs=1", f"data.unlabeled={tmp_path / 'pool-shards' / 'unlabeled'}"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 4
