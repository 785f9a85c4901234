"""What checkpointing costs: save time and size, training throughput with a checkpoint every N steps
versus never, and the per-step agreement on signals across ranks.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python benchmarks/checkpointing.py [--steps 200] [--rounds 5]

Torch runs on `--threads` (1) intra-op threads: on a machine shared with other jobs, two threads on
two busy cores made a step 12x slower than one (measured here), which would drown every difference.

1. Throughput. FixMatch on digits (configs/digits/fixmatch.yaml with batch 32, mu 2: ~130 ms a step
   here, the order of a GPU step of the real thing; one process, EMA on) for `--steps` steps,
   checkpointing never (only the final one every variant writes), every 100 steps (the default:
   `checkpoint_every_epochs: 1` at 100 steps per epoch) and every step. After one untimed warm-up
   run, the variants run in turn `--rounds` times. Reported: each variant's fastest round (train
   samples/s; other jobs only ever slow a run down, by up to 20% here, as `timeit` takes the
   minimum) against `never`'s, and the share of the run's wall time spent committing checkpoints,
   timed by the loop itself (TensorBoard `checkpoint/save_seconds`) in the same run, so load from
   other jobs hits both sides of that ratio alike: a small overhead stays visible under it.
2. Save time and size of one commit (write, fsync, barrier, marker, prune) for that run's checkpoint
   and for a ResNet-50-sized one (torchvision resnet50: network, EMA, SGD momentum): median of
   `--saves`, on the disk holding the temporary folder.
3. Agreement. Two processes (gloo): median time of the all-reduce every rank makes at each step
   boundary (`StepBoundary.decide`), against the median step time of a two-process run in the
   same launch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_ssl.config import TrainConfig, load_config  # noqa: E402
from dist_ssl.engine import checkpoint, preemption  # noqa: E402
from dist_ssl.engine.accelerator import make_accelerator  # noqa: E402
from dist_ssl.engine.loop import train  # noqa: E402

BATCH, MU = 32, 2
VARIANTS = {  # name -> (overrides, checkpoints a run of `steps` steps commits)
    "never": (["train.checkpoint_every_epochs=0"], lambda steps: 1),
    "every 100 steps (default)": (["train.checkpoint_every_epochs=1"], lambda steps: steps // 100),
    "every step": (["train.checkpoint_every_epochs=0", "train.checkpoint_every_steps=1"], lambda steps: steps),
}


def config(shards: Path, out: Path, steps: int, *overrides: str):
    return load_config(REPO / "configs" / "digits" / "fixmatch.yaml", [
        f"data.shards={shards}", f"train.output_dir={out}", "train.steps_per_epoch=100", f"train.epochs={steps // 100}",
        "train.eval_every_epochs=1000", "train.log_every_steps=50", "train.resume=never", f"data.batch_size={BATCH}",
        f"data.unlabeled_batch_ratio={MU}", *overrides,
    ])


def commit_seconds(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [event.value for event in events.Scalars("checkpoint/save_seconds")]


def throughput(shards: Path, work: Path, steps: int, rounds: int) -> dict[str, tuple[float, float]]:
    """name -> (fastest train samples/s, median share of the wall time spent committing)."""
    train(config(shards, work / "warm-up", steps))
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    shares: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(rounds):
        for index, (name, (overrides, commits)) in enumerate(VARIANTS.items()):
            # one folder per run: a shared one would mix two runs' checkpoints and TensorBoard events
            results = train(config(shards, work / f"{round_}-{index}", steps, *overrides))
            seconds = commit_seconds(Path(results["run_dir"]))
            assert len(seconds) == commits(steps), (name, len(seconds))
            rates[name].append(results["train_samples_per_second"])
            shares[name].append(sum(seconds) / results["wall_seconds"])
    return {name: (max(rates[name]), statistics.median(shares[name])) for name in VARIANTS}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def save_seconds(root: Path, shared: dict, per_rank: dict, saves: int) -> tuple[float, int]:
    accelerator = make_accelerator()
    times = []
    for i in range(saves):
        started = time.perf_counter()
        path = checkpoint.save(root, i + 1, accelerator, shared, per_rank, {"benchmark": True}, "train: {}\n", keep_last=2)
        times.append(time.perf_counter() - started)
    return statistics.median(times), folder_bytes(path)


def resnet50_payload() -> tuple[dict, dict]:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # creates the momentum buffers
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    shared = checkpoint.snapshot({"model": net}, {"model": ema}, {"model": optimizer}, {"model": scheduler}, None, {"step": 1})
    return shared, {"rng": checkpoint.rng_state()}


def agreement(result_file: Path, shards: Path, work: Path) -> None:
    """Runs in each of two processes (launched by `main` through accelerate)."""
    results = train(config(shards, work / "two-processes", 100))
    accelerator = make_accelerator()
    boundary = preemption.StepBoundary(TrainConfig(epochs=1, steps_per_epoch=10**9, checkpoint_every_epochs=0), accelerator)
    times = []
    for done in range(1, 3001):
        started = time.perf_counter()
        boundary.decide(done)
        times.append(time.perf_counter() - started)
    if accelerator.is_main_process:
        samples_per_step = BATCH * (1 + MU)
        result_file.write_text(json.dumps({
            "decide_seconds": statistics.median(times[500:]),
            "step_seconds": samples_per_step / results["train_samples_per_second"],
        }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per run (a multiple of 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--agreement", nargs=3, metavar=("RESULT", "SHARDS", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.agreement:
        agreement(*map(Path, args.agreement))
        return

    from dist_ssl.data.shards.writer import write_dataset
    from dist_ssl.data.sources import load_source

    print(f"allocator: MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')} "
          f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}; torch threads {torch.get_num_threads()}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="dist-ssl-ckpt-bench-") as tmp:
        work = Path(tmp)
        shards = work / "digits"
        write_dataset(load_source("digits"), shards, labels_per_class=5, seed=0)

        rates = throughput(shards, work / "runs", args.steps, args.rounds)
        print(f"\n1. throughput, fixmatch on digits (batch {BATCH}, mu {MU}), {args.steps} steps, one process, "
              f"fastest of {args.rounds} interleaved rounds")
        print(f"   {'checkpoint':<28}{'samples/s':>12}{'vs never':>10}{'time in commits':>17}{'vs never':>10}")
        never_rate, never_share = rates["never"]
        for name, (rate, share) in rates.items():
            print(f"   {name:<28}{rate:>12.0f}{1 - rate / never_rate:>+10.2%}{share:>17.2%}{share - never_share:>+10.2%}")

        run = work / "runs" / "warm-up"
        folder = checkpoint.latest(run / "checkpoints")
        shared = {stem: checkpoint.load_file(folder / f"{stem}.pt") for stem in ("model", "training")}
        own = checkpoint.load_file(folder / "rank-00000.pt")
        small = save_seconds(work / "saves-small", shared, own, args.saves)
        large = save_seconds(work / "saves-resnet50", *resnet50_payload(), args.saves)
        print(f"\n2. one commit (write + fsync + marker + prune), median of {args.saves}")
        for name, (seconds, size) in (("small_cnn on digits (the run above)", small), ("resnet50 + EMA + SGD momentum", large)):
            print(f"   {name:<38}{seconds * 1000:>9.1f} ms{size / 2**20:>10.2f} MiB")

        result = work / "agreement.json"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--num_processes", "2",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29400 + os.getpid() % 500),
                   __file__, "--agreement", str(result), str(shards), str(work)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        measured = json.loads(result.read_text())
        print("\n3. per-step agreement on signals and the minutes interval (2 processes, gloo)")
        print(f"   all-reduce {measured['decide_seconds'] * 1e6:.0f} us per step; step {measured['step_seconds'] * 1000:.0f} ms; "
              f"{measured['decide_seconds'] / measured['step_seconds']:.2%} of a step")


if __name__ == "__main__":
    main()
