"""MPL and SMPL do not depend on the number of processes: one process and two real gloo ranks
(`accelerate launch`) fed the same global batches take the same steps. One launch trains both.

Two moons (one shard per split): a strided split of one shard between two ranks gives each step the
same global batch as one process reading it whole. An MLP has no batch norm, whose per-rank batch
statistics would legitimately differ. Dropout is off, so nothing random differs between layouts.
"""

import subprocess
import sys

import pytest
import torch

from dist_ssl.engine import checkpoint
from tests.conftest import REPO, accelerate_command

pytestmark = pytest.mark.slow

STEPS = 3


@pytest.fixture(scope="module")
def moons_shards(tmp_path_factory):
    from dist_ssl.data.shards.manifest import load_manifest
    from dist_ssl.data.shards.writer import write_dataset
    from dist_ssl.data.sources import load_source

    out = tmp_path_factory.mktemp("shards") / "moons"
    write_dataset(load_source("moons", seed=0), out, labels_per_class=3, seed=0)
    assert all(len(load_manifest(out / split).shards) == 1 for split in ("labeled", "unlabeled", "test"))
    return out


METHODS = ("mpl", "smpl")


def command(shards, out):
    """Both methods in one process group (tests/train_each.py), each into out/<method>. UDA, label
    smoothing, the moving baseline and distribution alignment on (and the moons configs' noisy
    strong view), so every term of the losses is compared."""
    per_method = [f"method.{m}.{setting}" for m in METHODS for setting in (
        "uda_weight=1", "uda_steps=1", "threshold=0.5", "label_smoothing=0.1", "baseline_decay=0.9", "distribution_alignment=0.9")]
    return ["tests/train_each.py", str(out), *(f"configs/moons/{m}.yaml" for m in METHODS), "--", f"data.shards={shards}",
            "train.epochs=3", "train.steps_per_epoch=1", "train.keep_last=3", "train.log_every_steps=1", *per_method,
            "data.augment.vector_noise=0.4"]


def test_one_and_two_processes_take_the_same_steps(moons_shards, tmp_path):
    single = subprocess.run([sys.executable, *command(moons_shards, tmp_path / "one")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    double = subprocess.run(accelerate_command(2, *command(moons_shards, tmp_path / "two"), entry=()), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stdout + double.stderr
    for method in METHODS:
        check_same_steps(tmp_path / "one" / method, tmp_path / "two" / method)


def check_same_steps(one_run, two_run):
    for step in range(1, STEPS + 1):
        one = checkpoint.load_file(one_run / "checkpoints" / f"step-{step}" / "model.pt")["nets"]
        two = checkpoint.load_file(two_run / "checkpoints" / f"step-{step}" / "model.pt")["nets"]
        for role in one:
            for name, tensor in one[role].items():
                assert torch.allclose(tensor, two[role][name], rtol=1e-5, atol=1e-6), (one_run.name, step, role, name)
        # method state is saved per rank: both ranks of the two-process run must hold the same baseline
        states = [checkpoint.load_file(run / "checkpoints" / f"step-{step}" / f"rank-{rank:05d}.pt")["method"]
                  for run, rank in ((one_run, 0), (two_run, 0), (two_run, 1))]
        baselines = [state["baseline"] for state in states]
        assert baselines[1] == baselines[2]
        # a difference of two float32 losses summed in another order: equal to float32 resolution
        assert baselines[0] != 0.0 and baselines[0] == pytest.approx(baselines[1], rel=1e-3, abs=1e-7)
        # the class distributions are averaged over the global batch, not each rank's half
        assert states[1]["alignment"] == states[2]["alignment"]
        for key in ("labeled", "predicted"):
            assert states[0]["alignment"][key] == pytest.approx(states[1]["alignment"][key], rel=1e-6)
        assert states[0]["alignment"]["predicted"] != [0.5, 0.5]
    # the run really had two ranks, and the steps really moved the networks
    assert '"world_size": 2' in (two_run / "results.json").read_text()
    first = checkpoint.load_file(one_run / "checkpoints" / "step-1" / "model.pt")["nets"]
    last = checkpoint.load_file(one_run / "checkpoints" / f"step-{STEPS}" / "model.pt")["nets"]
    assert all(not torch.equal(first[r]["net.0.weight"], last[r]["net.0.weight"]) for r in first)
