"""The embedded demo: digits with 5 labels per class, three methods on N processes, one table and
one `dist-ssl report` per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dist_ssl.errors import UserError
from dist_ssl.report import write_report

METHODS = ("supervised", "pseudo_label", "fixmatch")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "digits"


def launch_command(processes: int, args: list[str]) -> list[str]:
    """`accelerate launch` for N > 1 processes (gloo on CPU, NCCL on GPUs), plain python for 1."""
    if processes == 1:
        return [sys.executable, "-m", "dist_ssl", *args]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
        "--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "dist_ssl", *args,
    ]


def run_demo(out: str | None, shards: str, processes: int) -> int:
    if processes < 1:
        raise UserError(f"--processes must be at least 1; got {processes}")
    if not CONFIGS.is_dir():
        raise UserError(f"demo configs not found at {CONFIGS}: run the demo from a checkout of dist-ssl")
    out_dir = Path(out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    shard_dir = Path(shards)
    if not (shard_dir / "test" / "manifest.json").is_file():
        from dist_ssl.data.shards.writer import write_dataset
        from dist_ssl.data.sources import load_source

        print(f"writing digits shards (5 labels per class, seed 0) to {shard_dir}", flush=True)
        write_dataset(load_source("digits"), shard_dir, labels_per_class=5, seed=0, maxcount=256)
    rows = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for method in METHODS:
        run_dir = out_dir / method
        print(f"\n== {method}: {processes} process(es) -> {run_dir}", flush=True)
        args = ["train", str(CONFIGS / f"{method}.yaml"), f"train.output_dir={run_dir}", f"data.shards={shard_dir}"]
        started = time.time()
        code = subprocess.call(launch_command(processes, args), env=env)
        if code != 0:
            print(f"dist-ssl: error: {method} run failed with exit code {code} (log above)", file=sys.stderr)
            return code
        results = json.loads((run_dir / "results.json").read_text())
        rows.append((method, results, time.time() - started))
        print(f"report: {write_report(run_dir)}", flush=True)
    print(f"\ndigits, {rows[0][1]['labels']} labels ({rows[0][1]['labels_per_class']} per class), {processes} process(es)")
    print(f"{'method':<14}{'test acc':>10}{'best':>8}{'steps':>7}{'samples/s':>11}{'wall s':>8}")
    for method, results, seconds in rows:
        rate = results["train_samples_per_second"] or 0
        print(f"{method:<14}{results['test_accuracy'] * 100:>9.2f}%{results['best_test_accuracy'] * 100:>7.2f}%{results['steps']:>7}{rate:>11.0f}{seconds:>8.0f}")
    table = {m: r for m, r, _ in rows}
    (out_dir / "summary.json").write_text(json.dumps(table, indent=1))
    return 0
