"""FreeMatch, SoftMatch and FlexMatch do not depend on the number of processes: one process and two
real gloo ranks (`accelerate launch`) fed the same global batches take the same steps, and both
ranks hold the same statistics and the same FlexMatch table. One launch trains the three methods.

Digits with one shard per split: two ranks read strided halves of the order one process reads
whole, so every step has the same global batch. An MLP has no batch norm, whose per-rank batch
statistics would legitimately differ; dropout is off and the EMA too, so nothing else differs.
The weak view runs in a forward pass of its own (`method.concat_forward=false`, two DDP forwards a
step, one without gradients); FixMatch's test (tests/engine/test_speed_switches.py) covers the
concatenated one.
"""

import subprocess
import sys

import pytest
import torch

from dist_ssl.engine import checkpoint
from tests.conftest import REPO, accelerate_command

pytestmark = pytest.mark.slow

METHODS = ("freematch", "softmatch", "flexmatch")
STEPS = 3
# lambda = 0.5 so that three steps move the statistics visibly; FlexMatch's tau low enough that an
# untrained network's predictions reach it, so the table fills and the thresholds move, and its
# distribution alignment on (averages over the global batch).
OVERRIDES = ["model.name=mlp", "model.hidden_sizes=[32]", "data.batch_size=20", "data.unlabeled_batch_ratio=3", "train.epochs=3",
             "train.steps_per_epoch=1", "train.keep_last=3", "train.log_every_steps=1", "train.ema_decay=0", "optim.lr=0.3",
             "method.freematch.ema_decay=0.5", "method.softmatch.ema_decay=0.5", "method.flexmatch.threshold=0.2",
             "method.flexmatch.distribution_alignment=0.5", "method.concat_forward=false"]


@pytest.fixture(scope="module")
def one_shard_digits(tmp_path_factory):
    from dist_ssl.data.shards.writer import write_dataset
    from dist_ssl.data.sources import load_source

    out = tmp_path_factory.mktemp("shards") / "digits-one-shard"
    write_dataset(load_source("digits"), out, labels_per_class=5, seed=0, maxcount=2000)
    return out


def command(out, shards):
    return ["tests/train_each.py", str(out), *(f"configs/digits/{m}.yaml" for m in METHODS), "--", f"data.shards={shards}", *OVERRIDES]


def rank_state(run, step, rank):
    return checkpoint.load_file(run / "checkpoints" / f"step-{step}" / f"rank-{rank:05d}.pt")["method"]


def test_one_and_two_processes_take_the_same_steps(one_shard_digits, tmp_path):
    single = subprocess.run([sys.executable, *command(tmp_path / "one", one_shard_digits)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    double = subprocess.run(accelerate_command(2, *command(tmp_path / "two", one_shard_digits), entry=()), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stdout + double.stderr
    for method in METHODS:
        one, two = tmp_path / "one" / method, tmp_path / "two" / method
        assert '"world_size": 2' in (two / "results.json").read_text()
        for step in range(1, STEPS + 1):
            weights = checkpoint.load_file(one / "checkpoints" / f"step-{step}" / "model.pt")["nets"]["model"]
            other = checkpoint.load_file(two / "checkpoints" / f"step-{step}" / "model.pt")["nets"]["model"]
            for name, tensor in weights.items():
                assert torch.allclose(tensor, other[name], rtol=1e-5, atol=1e-6), (method, step, name)
            alone, first, second = rank_state(one, step, 0), rank_state(two, step, 0), rank_state(two, step, 1)
            for key, value in alone.items():
                if isinstance(value, dict):  # FlexMatch's alignment: moving averages, lists of floats
                    assert first[key] == second[key], (method, step, key)
                    assert all(value[k] == pytest.approx(first[key][k], rel=1e-6) for k in value), (method, step, key)
                    continue
                assert torch.equal(first[key], second[key]), (method, step, key)  # every rank holds the same state
                if value.is_floating_point():  # float32 networks whose sums ran in another order
                    assert torch.allclose(value, first[key], rtol=1e-5, atol=1e-7), (method, step, key)
                else:
                    assert torch.equal(value, first[key]), (method, step, key)
        last = rank_state(one, STEPS, 0)
        if method == "flexmatch":  # the table filled: the thresholds it gives really moved
            assert 0 < int((last["status"] >= 0).sum()) < len(last["status"])
            assert last["alignment"]["predicted"] != pytest.approx([0.1] * 10)  # the alignment moved off uniform
        else:
            assert all(not torch.equal(value, rank_state(one, 1, 0)[key]) for key, value in last.items())
