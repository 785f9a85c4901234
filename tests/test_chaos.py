"""The chaos harness's short form: random faults in a two-process `train` and in a `pipeline`, and
not one difference from their uninterrupted runs (benchmarks/chaos.py; the long form is a benchmark)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_ten_random_faults_in_train_on_two_processes_and_in_a_pipeline_change_nothing(digits_shards, tmp_path):
    seed = os.environ.get("DIST_SSL_CHAOS_SEED", "0")  # timing varies by machine: each run explores other moments anyway
    result = subprocess.run(
        [sys.executable, "benchmarks/chaos.py", "--commands", "train-fixmatch-2:3,pipeline:7", "--seed", seed,
         "--work", str(tmp_path / "chaos"), "--shards", str(digits_shards)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    log = (tmp_path / "chaos" / "chaos.log").read_text() if (tmp_path / "chaos" / "chaos.log").is_file() else ""
    assert result.returncode == 0, result.stdout + result.stderr + log[-20000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "differences from the uninterrupted run: 0", result.stdout
    assert int(re.search(r"^faults injected: (\d+)$", result.stdout, re.M).group(1)) >= 10, result.stdout
    for name in ("train-fixmatch-2", "pipeline"):  # every command was hit, and restarted until it finished
        row = next(line for line in lines if line.startswith(f"| {name} |"))
        faults, exits = row.split("|")[2], row.split("|")[5]
        assert int(faults) >= 3 and re.search(r"(^|,)\s*0: \d", exits), row
