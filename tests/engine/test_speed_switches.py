"""The speed switches change how fast a step runs, not what it computes: the views' path (bit for
bit), channels_last, torch.compile and bf16 (to their arithmetic's tolerance); and one process
and two real gloo ranks take the same FixMatch steps with views computed on the device."""

import subprocess

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_ssl.engine import checkpoint
from dist_ssl.engine.loop import train
from tests.conftest import REPO, accelerate_command, run_cli, tiny_config
from tests.engine.test_loop import assert_same_weights, weights

STEPS = 4


def losses(run_dir, tag="train/loss"):
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def run(digits_shards, out, *switches):
    overrides = ["train.epochs=1", f"train.steps_per_epoch={STEPS}", "train.log_every_steps=1", "method.fixmatch.threshold=0.12", *switches]
    if any(s.startswith("train.mixed_precision") for s in switches):  # accelerate fixes it once per process
        tiny = tiny_config(digits_shards, out, "fixmatch")  # the same run, through the command line
        done = run_cli("train", "configs/digits/fixmatch.yaml", f"data.shards={digits_shards}", f"train.output_dir={out}",
                       f"data.batch_size={tiny.data.batch_size}", f"data.unlabeled_batch_ratio={tiny.data.unlabeled_batch_ratio}", *overrides)
        assert done.returncode == 0, done.stderr
    else:
        train(tiny_config(digits_shards, out, "fixmatch", *overrides))
    return losses(out)


@pytest.fixture(scope="module")
def reference(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return out, run(digits_shards, out)


def test_the_per_sample_path_and_the_batched_path_train_the_same_weights(digits_shards, tmp_path, reference):
    out, expected = reference
    assert max(losses(out, "train/mask_rate")) > 0  # the unlabeled loss took part
    assert run(digits_shards, tmp_path / "per_sample", "data.augment.path=per_sample") == expected
    assert_same_weights(weights(out), weights(tmp_path / "per_sample"))


@pytest.mark.parametrize("switch, tolerance", [("train.channels_last=true", 1e-5), ("train.mixed_precision=bf16", 3e-2),
                                               pytest.param("train.compile=true", 1e-4, marks=pytest.mark.slow)])
def test_a_speed_switch_leaves_the_first_losses_unchanged(digits_shards, tmp_path, reference, switch, tolerance):
    _, expected = reference
    got = run(digits_shards, tmp_path / "switched", switch)
    assert len(got) == STEPS
    assert got == pytest.approx(expected, rel=tolerance)


@pytest.fixture(scope="module")
def one_shard_digits(tmp_path_factory):
    """digits with one shard per split: two ranks read strided halves of the order one process
    reads whole, so both layouts see the same global batches."""
    from dist_ssl.data.shards.writer import write_dataset
    from dist_ssl.data.sources import load_source

    out = tmp_path_factory.mktemp("shards") / "digits-one-shard"
    write_dataset(load_source("digits"), out, labels_per_class=5, seed=0, maxcount=2000)
    return out


@pytest.mark.slow
def test_one_and_two_processes_take_the_same_fixmatch_steps_with_device_views(one_shard_digits, tmp_path):
    # an MLP on the images: no batch norm, whose per-rank statistics would legitimately differ
    args = ["train", "configs/digits/fixmatch.yaml", f"data.shards={one_shard_digits}", "model.name=mlp", "model.hidden_sizes=[32]",
            "data.batch_size=20", "data.unlabeled_batch_ratio=3", "train.epochs=3", "train.steps_per_epoch=1", "train.keep_last=3",
            "train.ema_decay=0", "method.fixmatch.threshold=0.12", "data.augment.path=batched"]
    single = run_cli(*args, f"train.output_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr
    double = subprocess.run(accelerate_command(2, *args, f"train.output_dir={tmp_path / 'two'}"), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stdout + double.stderr
    assert '"world_size": 2' in (tmp_path / "two" / "results.json").read_text()
    for step in (1, 2, 3):
        one = checkpoint.load_file(tmp_path / "one" / "checkpoints" / f"step-{step}" / "model.pt")["nets"]["model"]
        two = checkpoint.load_file(tmp_path / "two" / "checkpoints" / f"step-{step}" / "model.pt")["nets"]["model"]
        for name, tensor in one.items():
            assert torch.allclose(tensor, two[name], rtol=1e-5, atol=1e-6), (step, name)
    assert max(losses(tmp_path / "one", "train/mask_rate")) > 0
