"""`dist-ssl bench`: a real tiny protocol (digits, 1 and 2 labels per class, 2 draws, FixMatch, 3 steps
a run) through the real CLI, signalled during its first run, then finished, rerun,
and rerun after one run lost its results; and every bad protocol as one error line."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_ssl.bench import load_protocol
from dist_ssl.errors import UserError
from tests.conftest import REPO, run_cli
from tests.test_cli import one_error_line
from tests.test_report import assert_decodes

METHODS = {"fixmatch": str(REPO / "configs/digits/fixmatch.yaml")}
TINY = ["train.epochs=1", "train.steps_per_epoch=3", "data.batch_size=20", "data.unlabeled_batch_ratio=2"]
RUNS = [(method, labels, draw) for labels in (1, 2) for draw in (0, 1) for method in METHODS]


def protocol_text(out: Path, **changes) -> str:
    protocol = {"source": "digits", "labels_per_class": [1, 2], "draws": [0, 1], "processes": 1, "methods": METHODS,
                "overrides": TINY, "output_dir": str(out)}
    return yaml.safe_dump({**protocol, **changes}, sort_keys=False)


def results_of(out: Path, method: str, labels: int, draw: int) -> dict:
    return json.loads((out / "runs" / f"{method}-{labels}pc-draw{draw}" / "results.json").read_text())


def launched(stdout: str) -> list[str]:
    """The progress lines of the runs this bench trained (a skipped one says `done before`)."""
    return [line for line in stdout.splitlines() if line.startswith("bench: run ") and " -> " in line]


pytestmark = pytest.mark.slow  # 5 real runs: the fixture's 4 and one retrained


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The protocol stopped by SIGTERM during its first run's training, then run to the end."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    path = root / "protocol.yaml"
    path.write_text(protocol_text(out))
    env = dict(os.environ, PYTHONUNBUFFERED="1", DIST_SSL_PROGRESS_SECONDS="0")  # a progress line after every step
    with open(root / "stopped.out", "w+") as stdout:
        bench = subprocess.Popen([sys.executable, "-m", "dist_ssl", "bench", str(path)], cwd=REPO, env=env,
                                 stdout=stdout, stderr=subprocess.PIPE, text=True)
        stderr = []
        for line in bench.stderr:  # the first run's first step is done: it is training
            stderr.append(line)
            if line.startswith("step 1/3"):
                bench.send_signal(signal.SIGTERM)
                break
        stderr += bench.stderr.readlines()
        stopped = subprocess.CompletedProcess(bench.args, bench.wait(timeout=120), None, "".join(stderr))
        stdout.seek(0)
        stopped.stdout = stdout.read()
    finished = run_cli("bench", str(path), env={"DIST_SSL_PROGRESS_SECONDS": "0"})
    return {"path": path, "out": out, "stopped": stopped, "finished": finished}


def test_a_signal_stops_the_bench_after_its_run_committed_and_the_rerun_resumes_it(bench):
    stopped, finished = bench["stopped"], bench["finished"]
    assert stopped.returncode == 75, stopped.stderr
    assert "dist-ssl: bench stopped by SIGTERM during run 1/4 (fixmatch-1pc-draw0, exit 75)" in stopped.stderr
    assert launched(stopped.stdout) == [f"bench: run 1/4 fixmatch labels=1 draw=0 -> {bench['out']}/runs/fixmatch-1pc-draw0"]

    assert finished.returncode == 0, finished.stderr
    lines = launched(finished.stdout)
    assert len(lines) == 4
    assert lines[0].endswith("fixmatch-1pc-draw0 (resuming)")
    # It committed a step before the last (the signal came after step 1) and went on from there.
    assert re.search(rf"resumed from {bench['out']}/runs/fixmatch-1pc-draw0/checkpoints/step-[12] at step [12]\n", finished.stdout)
    assert lines[2] == f"bench: run 3/4 fixmatch labels=2 draw=0 -> {bench['out']}/runs/fixmatch-2pc-draw0"
    # Each dataset written once, just before its first run: `shards write --seed D` for draw D.
    writes = [line for line in finished.stdout.splitlines() if line.startswith("bench: writing")]
    assert len(writes) == 3  # the fourth, labels=1 draw=0, was written before the signal
    for labels in (1, 2):
        for draw in (0, 1):
            manifest = json.loads((bench["out"] / "shards" / f"digits-{labels}pc-draw{draw}" / "labeled" / "manifest.json").read_text())
            assert manifest["protocol"]["labels_per_class"] == labels and manifest["protocol"]["seed"] == draw


def test_tables_hold_each_draws_accuracy_from_its_results_json(bench):
    out = bench["out"]
    with open(out / "bench.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["labels_per_class"]) for r in rows] == [("fixmatch", "1"), ("fixmatch", "2")]
    md = (out / "bench.md").read_text()
    assert "4 of 4 runs done" in md
    for row in rows:
        method, labels = row["method"], int(row["labels_per_class"])
        runs = [results_of(out, method, labels, draw) for draw in (0, 1)]
        accuracies = [r["test_accuracy"] for r in runs]
        assert [float(row[f"test_accuracy_draw{d}"]) for d in (0, 1)] == accuracies
        assert [float(row[f"wall_seconds_draw{d}"]) for d in (0, 1)] == [r["wall_seconds"] for r in runs]
        assert all(r["labels_per_class"] == labels and r["method"] == method and r["steps"] == 3 for r in runs)
        assert float(row["mean_test_accuracy"]) == pytest.approx(statistics.mean(accuracies), abs=1e-15)
        assert float(row["std_test_accuracy"]) == pytest.approx(statistics.stdev(accuracies), abs=1e-15)
        a0, a1 = (a * 100 for a in accuracies)
        walls = ", ".join(f"{r['wall_seconds']:.0f}" for r in runs)
        line = (f"| {method} | {labels} | {statistics.mean(accuracies) * 100:.2f} ± {statistics.stdev(accuracies) * 100:.2f} "
                f"| {a0:.2f} | {a1:.2f} | {walls} |")
        assert line in md, md
    assert_decodes(out / "bench.png", min_size=(400, 100))


def test_a_rerun_skips_every_finished_run(bench):
    out = bench["out"]
    before = {run: results_of(out, *run) for run in RUNS}
    again = run_cli("bench", str(bench["path"]))
    assert again.returncode == 0, again.stderr
    assert launched(again.stdout) == []
    assert sum(" done before (test accuracy " in line for line in again.stdout.splitlines()) == 4
    assert {run: results_of(out, *run) for run in RUNS} == before


def test_a_run_that_lost_its_results_is_the_only_one_trained_again(bench):
    out = bench["out"]
    lost = ("fixmatch", 2, 1)
    (out / "runs" / "fixmatch-2pc-draw1" / "results.json").unlink()  # as if killed before its end
    before = {run: results_of(out, *run) for run in RUNS if run != lost}
    again = run_cli("bench", str(bench["path"]))
    assert again.returncode == 0, again.stderr
    assert launched(again.stdout) == [f"bench: run 4/4 fixmatch labels=2 draw=1 -> {out}/runs/fixmatch-2pc-draw1 (resuming)"]
    assert {run: results_of(out, *run) for run in RUNS if run != lost} == before
    assert results_of(out, *lost)["steps"] == 3


def test_a_finished_run_of_another_config_is_refused(bench, tmp_path):
    changed = tmp_path / "changed.yaml"
    changed.write_text(protocol_text(bench["out"], overrides=[*TINY[:-1], "data.unlabeled_batch_ratio=3"]))
    result = run_cli("bench", str(changed))
    one_error_line(result, "was trained with another config (data.unlabeled_batch_ratio is 2 there, 3 here)")


@pytest.mark.parametrize("changes, expected", [
    ({"draw": [0]}, "unknown key 'draw' (did you mean 'draws'?)"),
    ({"methods": {**METHODS, "freematch": "configs/digits/nope.yaml"}}, "methods.freematch: config file not found: configs/digits/nope.yaml"),
    ({"draws": "one"}, "key 'draws' expects int; got 'one'"),
    ({"labels_per_class": {"a": 1}}, "key 'labels_per_class' expects a list"),
    ({"processes": 0}, "key 'processes' must be >= 1; got 0"),
    ({"output_dir": None}, "key 'output_dir' has no value"),
    ({"draws": [0, 0]}, "key 'draws' lists a value twice: [0, 0]"),
    ({"source": "digit"}, "names no `shards write` source: 'digit' (did you mean 'digits'?)"),
    ({"methods": ["fixmatch"]}, "key 'methods' maps each method's name to its config file"),
    ({"overrides": ["data.shards=elsewhere"]}, "key 'overrides' may not set data.shards"),
    ({"overrides": ["train.epoch=1"]}, "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
])
def test_a_bad_protocol_is_one_clear_error(tmp_path, changes, expected):
    path = tmp_path / "protocol.yaml"
    path.write_text(protocol_text(tmp_path / "out", **changes))
    with pytest.raises(UserError) as raised:
        load_protocol(path)
    assert str(raised.value).startswith(f"protocol {path}: ") and expected in str(raised.value), raised.value


def test_bad_protocols_through_the_cli(tmp_path):
    path = tmp_path / "protocol.yaml"
    path.write_text("source: digits\nlabels_per_class: [1]\ndraws: [0]\n")
    one_error_line(run_cli("bench", str(path)), f"protocol {path}: missing keys 'methods', 'output_dir'")
    one_error_line(run_cli("bench", str(tmp_path / "nope.yaml")), f"protocol file not found: {tmp_path / 'nope.yaml'}")
    path.write_text("- digits\n")
    one_error_line(run_cli("bench", str(path)), "must be a mapping of keys (source, labels_per_class")
    assert not (tmp_path / "out").exists()
