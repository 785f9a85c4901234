"""Elastic determinism in real training runs (issue 19): the same global batches on 1, 2 and 4
processes and with 0 or 2 DataLoader workers; for a network without batch norm, and for one with
batch norm under train.sync_batchnorm, the same weights; a run checkpointed on 4 processes and
resumed on 2 continues the uninterrupted run.

Three launches serve every assertion (tests/data/elastic_jobs.py runs several trainings in one
process group): 4 processes with 0 workers, 2 processes with 2 workers (digits) and 1 process.
"""

import json
import subprocess
import sys
import time

import pytest
import torch

from dist_ssl.engine import checkpoint
from tests.conftest import REPO, accelerate_command

pytestmark = pytest.mark.slow

# digits FixMatch (small_cnn: batch norm, over the global batch): 13 unlabeled shards; batches of
# 20 + 40 over 64 virtual consumers can be shared by 1, 2 or 4 processes (gcd(64, 20) = 4)
DIGITS = ["data.batch_size=20", "data.unlabeled_batch_ratio=2", "train.epochs=2", "train.steps_per_epoch=4",
          "train.log_every_steps=2", "train.keep_last=4", "train.sync_batchnorm=true"]
DIGITS_STEPS, DIGITS_RESUME = 8, 4
# moons FixMatch (MLP 8-8: no batch norm; distribution alignment reduced over ranks): 7 unlabeled shards
MOONS = ["data.batch_size=8", "data.unlabeled_batch_ratio=16", "train.epochs=3", "train.steps_per_epoch=20",
         "train.log_every_steps=10", "train.keep_last=4"]
MOONS_STEPS, MOONS_RESUME = 60, 20
# measured: moons weights and losses within 1.2e-7; digits with sync batch norm within 3e-7 (0.046 without)
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def job(config, shards, out, *overrides):
    return {"config": str(REPO / "configs" / config), "overrides": [f"data.shards={shards}", f"train.output_dir={out}", *overrides]}


def launch(processes, jobs, path, timeout=600):
    path.write_text(json.dumps(jobs))
    entry = ("tests/data/elastic_jobs.py",)
    command = accelerate_command(processes, str(path), entry=entry) if processes > 1 else [sys.executable, *entry, str(path)]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return time.time() - started


@pytest.fixture(scope="module")
def runs(digits_shards, tmp_path_factory):
    from dist_ssl.data.shards.writer import write_dataset
    from dist_ssl.data.sources import load_source

    root = tmp_path_factory.mktemp("elastic")
    moons = root / "moons"
    write_dataset(load_source("moons"), moons, labels_per_class=4, seed=0, maxcount=200)
    out = {name: root / name for name in ("digits_4", "digits_2", "digits_1", "digits_resumed", "moons_4", "moons_2", "moons_1", "moons_resumed")}
    seconds = {}
    seconds[4] = launch(4, [job("digits/fixmatch.yaml", digits_shards, out["digits_4"], *DIGITS),
                            job("moons/fixmatch.yaml", moons, out["moons_4"], *MOONS)], root / "four.json")
    digits_at = out["digits_4"] / "checkpoints" / f"step-{DIGITS_RESUME}"
    moons_at = out["moons_4"] / "checkpoints" / f"step-{MOONS_RESUME}"
    seconds[2] = launch(2, [job("digits/fixmatch.yaml", digits_shards, out["digits_2"], *DIGITS, "data.workers=2"),
                            job("digits/fixmatch.yaml", digits_shards, out["digits_resumed"], *DIGITS, "data.workers=2", f"train.resume={digits_at}"),
                            job("moons/fixmatch.yaml", moons, out["moons_2"], *MOONS),
                            job("moons/fixmatch.yaml", moons, out["moons_resumed"], *MOONS, f"train.resume={moons_at}")], root / "two.json")
    seconds[1] = launch(1, [job("digits/fixmatch.yaml", digits_shards, out["digits_1"], *DIGITS),
                            job("moons/fixmatch.yaml", moons, out["moons_1"], *MOONS)], root / "one.json")
    print(f"launch seconds: {seconds}")
    return out


def steps(run):
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def final(run):
    return (json.loads((run / "results.json").read_text()),
            checkpoint.load_file(checkpoint.latest(run / "checkpoints") / "model.pt")["nets"]["model"])


def test_the_same_global_batches_on_1_2_and_4_processes_with_0_and_2_workers(runs):
    """digits FixMatch (several shards per split): every global step's labeled batch (keys and weak
    views) and unlabeled batch (keys and strong views) hash the same on 1 process, 2 processes x 2
    workers and 4 processes."""
    reference = steps(runs["digits_1"])
    assert [row["step"] for row in reference] == list(range(1, DIGITS_STEPS + 1))
    assert len({row["unlabeled"] for row in reference}) == DIGITS_STEPS  # the hashes do see the batches
    for layout in ("digits_2", "digits_4"):
        assert [(r["labeled"], r["unlabeled"]) for r in steps(runs[layout])] == [(r["labeled"], r["unlabeled"]) for r in reference], layout


def test_a_network_without_batch_norm_ends_with_the_same_weights_on_1_2_and_4_processes(runs):
    results_1, weights_1 = final(runs["moons_1"])
    for layout in ("moons_2", "moons_4"):
        results, weights = final(runs[layout])
        assert results["world_size"] == int(layout[-1]) and results["steps"] == MOONS_STEPS
        for name, value in weights_1.items():
            torch.testing.assert_close(weights[name], value, **TOLERANCE, msg=f"{layout}: {name}")
        assert results["test_accuracy"] == results_1["test_accuracy"]
    curves = [[row["loss"] for row in steps(runs[layout])] for layout in ("moons_1", "moons_2", "moons_4")]
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), **TOLERANCE)
    torch.testing.assert_close(torch.tensor(curves[2]), torch.tensor(curves[0]), **TOLERANCE)


def test_a_run_checkpointed_on_4_processes_continues_on_2_as_if_uninterrupted(runs):
    """Killed after step N's checkpoint on 4 processes (what a kill leaves) and resumed on 2: the moons
    MLP follows the uninterrupted 4-process loss curve to the same weights; digits (batch norm)
    sees the same global batches."""
    uninterrupted, resumed = steps(runs["moons_4"]), steps(runs["moons_resumed"])
    assert [row["step"] for row in resumed] == list(range(MOONS_RESUME + 1, MOONS_STEPS + 1))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in resumed]), torch.tensor([r["loss"] for r in uninterrupted[MOONS_RESUME:]]), **TOLERANCE)
    (results_4, weights_4), (results, weights) = final(runs["moons_4"]), final(runs["moons_resumed"])
    assert results["world_size"] == 2
    for name, value in weights_4.items():
        torch.testing.assert_close(weights[name], value, **TOLERANCE, msg=name)
    assert [(r["labeled"], r["unlabeled"]) for r in steps(runs["digits_resumed"])] == \
        [(r["labeled"], r["unlabeled"]) for r in steps(runs["digits_4"])[DIGITS_RESUME:]]


def test_with_sync_batchnorm_a_network_with_batch_norm_ends_with_the_same_weights(runs):
    """digits FixMatch with train.sync_batchnorm (GlobalBatchNorm over gloo; one process: plain batch
    norm): the same loss curve and weights, running statistics included, on 1, 2 and 4 processes
    and after a resume from 4 on 2."""
    results_1, weights_1 = final(runs["digits_1"])
    curve_1 = torch.tensor([row["loss"] for row in steps(runs["digits_1"])])
    for layout in ("digits_2", "digits_4"):
        results, weights = final(runs[layout])
        assert results["world_size"] == int(layout[-1]) and results["steps"] == DIGITS_STEPS
        for name, value in weights_1.items():
            torch.testing.assert_close(weights[name], value, **TOLERANCE, msg=f"{layout}: {name}")
        torch.testing.assert_close(torch.tensor([row["loss"] for row in steps(runs[layout])]), curve_1, **TOLERANCE)
        assert results["test_accuracy"] == results_1["test_accuracy"]
    _, weights = final(runs["digits_resumed"])
    for name, value in weights_1.items():
        torch.testing.assert_close(weights[name], value, **TOLERANCE, msg=f"resumed: {name}")
