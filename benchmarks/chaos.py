"""Chaos: every command, killed anywhere any number of times, ends where an uninterrupted run ends.

    python benchmarks/chaos.py --faults 50 --seed 7                 # every command below
    python benchmarks/chaos.py --faults 4 --commands train-fixmatch-2,pipeline   # a few minutes
    python benchmarks/chaos.py --commands train-fixmatch-2:4,pipeline:6            # faults per command

For each command the harness first runs it once without faults (the reference, in its own folder).
Then it runs it in a second folder the way a requeue wrapper would, the same command again after
every exit that is not 0, and injects faults drawn from the seed, one per start:

* signals at a random moment: SIGKILL of one rank, of every rank, of the launcher's whole process
  tree; SIGTERM and SIGUSR1 to one rank and to every process of the tree (what SLURM and a
  preempting cloud send);
* deaths at named points of the real write path (`files.DIE_WRITING`): a rank SIGKILLs itself half-way
  through its N-th write of a checkpoint file, a `COMMITTED` marker, a pseudo-label output shard, a
  selected shard, a manifest or a results file.

It records every fault, every start's exit status and the step each start resumed from. When a
command finishes before all of its faults landed, the rest go to a fresh chaos folder of the same
command (from scratch), so every planned fault is injected. Each chaos folder is then compared with
the reference, file by file: checkpoints of the last step (weights, optimizer, RNG, stream
positions: bit for bit), pseudo-label outputs (keys, labels, probabilities: equal, no key twice),
selected shards (byte for byte), every results.json / manifest.json / job.json (equal but for wall
times and the folder's own path), configs; TensorBoard must not hold a step logged twice with
different values (timings aside), and no lock, temporary file, pruned or uncommitted checkpoint or
PREEMPTED marker may be left. The last line is `differences from the uninterrupted run: N`; the exit
status is 1 when N is not 0.

Budgets are tiny (a few optimizer steps per command): what is measured is the machinery, not
accuracy. The time each fault cost is the chaos folder's total wall time minus the reference's,
divided by the faults it took.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("supervised", "pseudo_label", "fixmatch", "freematch", "softmatch", "flexmatch", "mpl", "smpl")
TRAIN = ["train.epochs=2", "train.steps_per_epoch=6", "train.checkpoint_every_steps=2", "train.log_every_steps=2",
         "data.batch_size=16", "data.unlabeled_batch_ratio=2", "data.eval_batch_size=512"]
PIPELINE = ["teacher.train.epochs=1", "teacher.train.steps_per_epoch=8", "student.train.epochs=1", "student.train.steps_per_epoch=8",
            "finetune.train.epochs=1", "finetune.train.steps_per_epoch=4", "select.top_k=10", "select.maxcount=40",
            "teacher.train.checkpoint_every_steps=2", "student.train.checkpoint_every_steps=2", "finetune.train.checkpoint_every_steps=2",
            "pseudo_label.batch_size=128", "pseudo_label.workers=0"]
SIGNAL_FAULTS = ("kill-rank", "kill-all", "kill-tree", "term-rank", "term-tree", "usr1-rank", "usr1-tree")
VOLATILE = re.compile(r"wall|seconds|per_second|wait_fraction|saved_at|started|heartbeat|manifest_sha256")  # clocks; hashes of files that hold the run's own paths
DIE_WRITING = "DIST_SSL_DIE_WRITING"


@dataclass
class Command:
    name: str
    processes: int
    args: list[str]  # dist-ssl arguments; OUT stands for the output folder
    writes: tuple[str, ...]  # file-name patterns of its write points
    needs: tuple[str, ...] = ()  # setup products it reads


@dataclass
class Start:
    fault: str | None
    exit: int
    resumed_from: str | None
    seconds: float
    landed: bool


@dataclass
class Outcome:
    command: Command
    reference_seconds: float = 0.0
    folders: list[dict] = field(default_factory=list)  # one per chaos folder: {"starts": [Start], "seconds": s}
    differences: list[str] = field(default_factory=list)


def commands(work: Path, shards: Path) -> dict[str, Command]:
    shards = str(shards)
    found = {}
    for method in METHODS:
        for processes in (1, 2):
            found[f"train-{method}-{processes}"] = Command(
                f"train-{method}-{processes}", processes,
                ["train", f"configs/digits/{method}.yaml", f"data.shards={shards}", "train.output_dir=OUT", *TRAIN,
                 *(["roles.student.wait_steps=4", "optim.warmup_steps=2"] if method in ("mpl", "smpl") else [])],
                ("rank-*.pt", "model.pt", "training.pt", "COMMITTED", "results.json"))
    teacher = str(work / "teacher")
    for processes in (1, 2):
        found[f"pseudo-label-{processes}"] = Command(
            f"pseudo-label-{processes}", processes,
            ["pseudo-label", teacher, "--shards", f"{shards}/unlabeled", "--out", "OUT", "--batch-size", "64", "--workers", "0"],
            ("predictions-*.npz", "manifest.json"), needs=("teacher",))
    found["select"] = Command("select", 1, ["select", str(work / "labels"), "--out", "OUT", "--top-k", "10", "--maxcount", "20"],
                              ("selected-*.tar", "selected-*.json", "plan.npz", "manifest.json"), needs=("labels",))
    for name, config, extra in (("pipeline", "digits_billion_scale.yaml", []),
                                ("pipeline-rounds", "digits_self_training.yaml", ["rounds=2"])):
        found[name] = Command(name, 1, ["pipeline", f"configs/pipelines/{config}", f"shards={shards}", "output_dir=OUT", *PIPELINE, *extra],
                              ("rank-*.pt", "COMMITTED", "predictions-*.npz", "selected-*.tar", "manifest.json", "results.json"))
    return found


# ----------------------------------------------------------------------------------------------
# running


def command_line(cmd: Command, out: Path) -> list[str]:
    args = [str(out) if a == "OUT" else a.replace("=OUT", f"={out}") for a in cmd.args]
    if cmd.processes == 1:
        return [sys.executable, "-m", "dist_ssl", *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--num_processes",
            str(cmd.processes), "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "dist_ssl", *args]


def tree(pid: int) -> list:
    import psutil

    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def ranks(pid: int, processes: int) -> list:
    """The rank processes of a start: the process itself, or the launcher's direct children (their
    own children are DataLoader workers)."""
    members = tree(pid)
    if processes == 1:
        return members[:1]
    return [p for p in members[1:] if p.ppid() == pid]


def send(procs: list, sig: int) -> None:
    import psutil

    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def run_once(cmd: Command, out: Path, env: dict, fault: str | None, delay: float, rng: random.Random, log) -> Start:
    """One start of `cmd` in `out`; a signal fault is sent `delay` s after the start. Waits for every
    process of the start to be gone (a rank left behind would still hold the run lock)."""
    started = time.time()
    proc = subprocess.Popen(command_line(cmd, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    everyone = []
    landed = False
    if fault in SIGNAL_FAULTS:
        deadline = started + delay
        while proc.poll() is None and time.time() < deadline:
            everyone = tree(proc.pid) or everyone
            time.sleep(0.01)
        if proc.poll() is None:
            kind, target = fault.split("-")
            sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "usr1": signal.SIGUSR1}[kind]
            members = tree(proc.pid)
            everyone = members or everyone
            if target == "rank":
                chosen = ranks(proc.pid, cmd.processes)
                victims = [rng.choice(chosen)] if chosen else members[:1]
            elif target == "all":
                victims = ranks(proc.pid, cmd.processes) + members[:1]
            else:
                victims = members
            send(victims, sig)
            landed = True
    try:
        text, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        send(tree(proc.pid), signal.SIGKILL)
        text, _ = proc.communicate()
        text += "\nchaos: killed after 900 s"
    for member in everyone:  # ranks outliving their launcher must end before the next start
        try:
            member.wait(timeout=120)
        except Exception:
            pass
    if fault and fault.startswith("die-"):
        landed = proc.returncode != 0  # a rank reached the write point and killed itself
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", text)
    log.write(f"$ {' '.join(command_line(cmd, out))}\n# fault {fault} after {delay:.2f} s, exit {proc.returncode}\n{text}\n")
    return Start(fault, proc.returncode, ", ".join(f"{Path(p).parent.parent.name}/{Path(p).name}" for p, _ in resumed) or None,
                 time.time() - started, landed)


def draw_fault(cmd: Command, rng: random.Random, reference_seconds: float) -> tuple[str, float, dict]:
    """A fault for one start: (kind, delay for signals, environment for write points)."""
    if rng.random() < 0.35:
        pattern = rng.choice(cmd.writes)
        nth = rng.randint(1, 3)
        rank = f":{rng.randrange(cmd.processes)}" if cmd.processes > 1 else ""
        return f"die-writing {pattern}@{nth}{rank}", 0.0, {DIE_WRITING: f"{pattern}@{nth}{rank}"}
    kind = rng.choice([f for f in SIGNAL_FAULTS if cmd.processes > 1 or f != "kill-all"])
    return kind, rng.uniform(0.05, 0.9) * reference_seconds, {}


def run_chaos(cmd: Command, work: Path, faults: int, rng: random.Random, log) -> Outcome:
    outcome = Outcome(cmd)
    reference = work / "reference" / cmd.name
    shutil.rmtree(reference, ignore_errors=True)
    base_env = dict(os.environ, OMP_NUM_THREADS="1")
    base_env.pop(DIE_WRITING, None)
    first = run_once(cmd, reference, base_env, None, 0.0, rng, log)
    outcome.reference_seconds = first.seconds
    if first.exit != 0:
        outcome.differences.append(f"{cmd.name}: the uninterrupted run exited {first.exit} (see the log)")
        return outcome
    remaining, copy = faults, 0
    while remaining > 0 or copy == 0:
        copy += 1
        folder = work / "chaos" / f"{cmd.name}-{copy}"
        shutil.rmtree(folder, ignore_errors=True)
        starts: list[Start] = []
        finished = False
        while remaining > 0:
            kind, delay, extra = draw_fault(cmd, rng, outcome.reference_seconds)
            start = run_once(cmd, folder, dict(base_env, **extra), kind, delay, rng, log)
            starts.append(start)
            if start.landed:
                remaining -= 1
            if start.exit == 2:
                outcome.differences.append(f"{cmd.name}: a start after a fault failed as a user error (exit 2; see the log)")
            if start.exit == 0 and not start.landed:
                finished = True
                break
        tries = 0
        while not finished and tries < 4:  # the requeue wrapper: again until exit 0
            start = run_once(cmd, folder, base_env, None, 0.0, rng, log)
            starts.append(start)
            finished, tries = start.exit == 0, tries + 1
        if not finished:
            outcome.differences.append(f"{cmd.name}: {folder} did not finish in 4 starts without faults")
        outcome.folders.append({"folder": folder, "starts": starts, "seconds": sum(s.seconds for s in starts)})
        outcome.differences += [f"{cmd.name}: {d}" for d in compare(reference, folder)]
        if remaining > 0 and copy >= faults + 2:
            outcome.differences.append(f"{cmd.name}: {remaining} faults could not be placed")
            break
    return outcome


# ----------------------------------------------------------------------------------------------
# comparing


def _load(path: Path):
    if path.suffix == ".pt":
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if path.suffix == ".json" or path.name == "PREEMPTED":
        return json.loads(path.read_text())
    if path.suffix in (".yaml", ".txt", ".md", "") or path.name == "COMMITTED":
        return path.read_text()
    return path.read_bytes()


def _same(a, b, where: str, paths: tuple[str, str]) -> str | None:
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        ok = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return None if ok else f"{where}: tensors differ"
    if isinstance(a, np.ndarray):
        ok = isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        if not ok and a.dtype.kind in "US" and a.shape == () and isinstance(b, np.ndarray):
            return _same(str(a).replace(paths[0], paths[1]), str(b), where, paths)
        return None if ok else f"{where}: arrays differ"
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else type(b).__name__}"
        for key in a:
            if isinstance(key, str) and VOLATILE.search(key):
                continue
            found = _same(a[key], b[key], f"{where}/{key}", paths)
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _same(x, y, f"{where}[{i}]", paths)
            if found:
                return found
        return None
    if isinstance(a, str) and isinstance(b, str):
        a = a.replace(paths[0], paths[1])
    return None if a == b else f"{where}: {str(a)[:80]!r} != {str(b)[:80]!r}"


_SKIPPED = re.compile(r"events\.out\.tfevents|\.log$|\.png$|^report")  # clocks and pictures of clocks


def compare(reference: Path, chaos: Path) -> list[str]:
    """What differs between the uninterrupted run's folder and the chaos folder (empty: nothing)."""
    differences = leftovers(chaos)
    ref_files = _compared_files(reference)
    chaos_files = _compared_files(chaos)
    if set(ref_files) != set(chaos_files):
        only = sorted(set(ref_files) ^ set(chaos_files))
        differences.append(f"{chaos.name}: files present in one run only: {only[:4]}")
    paths = (str(reference.resolve()), str(chaos.resolve()))
    for rel in sorted(set(ref_files) & set(chaos_files)):
        found = _same(_load(reference / rel), _load(chaos / rel), rel, paths)
        if found:
            differences.append(f"{chaos.name}: {found}")
    differences += tensorboard_repeats(chaos)
    return differences


def _compared_files(root: Path) -> list[str]:
    """Relative paths of every file the two runs must share: everything but clocks, the lock, and
    checkpoints older than each run folder's last one (which exist depends on when faults hit)."""
    found = []
    for path in root.rglob("*"):
        if not path.is_file() or _SKIPPED.search(path.name):
            continue
        rel = path.relative_to(root)
        step = next((p for p in rel.parts if re.fullmatch(r"step-\d+", p)), None)
        if step is not None:
            checkpoints = root.joinpath(*rel.parts[: rel.parts.index(step)])
            steps = [int(p.name[5:]) for p in checkpoints.iterdir() if re.fullmatch(r"step-\d+", p.name)]
            if int(step[5:]) != max(steps):
                continue
        found.append(str(rel))
    return found


def leftovers(root: Path) -> list[str]:
    bad = []
    for path in root.rglob("*"):
        name = path.name
        if re.search(r"\.tmp\d*$|\.pruned$|\.partial-|^dist-ssl\.lock", name) or name == "PREEMPTED":
            bad.append(str(path.relative_to(root)))
        elif re.fullmatch(r"step-\d+", name) and path.is_dir() and not (path / "COMMITTED").is_file():
            bad.append(f"{path.relative_to(root)} (uncommitted)")
    return [f"{root.name}: left behind: {', '.join(bad[:4])}"] if bad else []


def tensorboard_repeats(root: Path) -> list[str]:
    """(folder, tag, step) logged more than once with different values: none may be (clocks aside)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seen: dict[tuple, set] = {}
    for events in root.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if VOLATILE.search(value.tag) or value.tag.endswith("per_second"):
                    continue
                if value.HasField("simple_value"):
                    number = value.simple_value
                elif value.HasField("tensor") and value.tensor.float_val:
                    number = tuple(value.tensor.float_val)
                else:
                    continue
                seen.setdefault((str(events.parent.relative_to(root)), value.tag, event.step), set()).add(number)
    repeats = [key for key, values in seen.items() if len(values) > 1]
    return [f"{root.name}: TensorBoard {folder} {tag} step {step} logged with {len(seen[(folder, tag, step)])} values"
            for folder, tag, step in repeats[:4]]


# ----------------------------------------------------------------------------------------------
# setup and report


def setup(work: Path, shards: Path, needs: set[str]) -> None:
    """The dataset (several shards per split, unless given), a teacher and its pseudo-labels, made once."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(DIE_WRITING, None)

    def dist_ssl(*args):
        result = subprocess.run([sys.executable, "-m", "dist_ssl", *args], cwd=REPO, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            sys.exit(f"chaos: setup failed: dist-ssl {' '.join(args)}\n{result.stdout}{result.stderr}")

    if not (shards / "test" / "manifest.json").is_file():
        shutil.rmtree(shards, ignore_errors=True)
        dist_ssl("shards", "write", "digits", "--out", str(shards), "--labels-per-class", "5", "--seed", "0", "--maxcount", "300")
    if needs & {"teacher", "labels"} and not (work / "teacher" / "results.json").is_file():
        dist_ssl("train", "configs/digits/supervised.yaml", f"data.shards={shards}", f"train.output_dir={work / 'teacher'}",
                 "train.epochs=1", "train.steps_per_epoch=20")
    if "labels" in needs and not (work / "labels" / "manifest.json").is_file():
        dist_ssl("pseudo-label", str(work / "teacher"), "--shards", str(shards / "unlabeled"), "--out", str(work / "labels"), "--workers", "0")


def report(outcomes: list[Outcome], seed: int, seconds: float) -> int:
    print(f"\nchaos: seed {seed}, {seconds:.0f} s")
    print("| command | faults | by kind | starts | exits | resumed from | reference s | lost s per fault | differences |")
    print("|---|---|---|---|---|---|---|---|---|")
    total = 0
    for outcome in outcomes:
        starts = [s for folder in outcome.folders for s in folder["starts"]]
        landed = [s for s in starts if s.landed]
        kinds = Counter(s.fault.split(" ")[0] for s in landed)
        exits = Counter(s.exit for s in starts)
        chaos_seconds = sum(f["seconds"] for f in outcome.folders)
        lost = (chaos_seconds - outcome.reference_seconds * len(outcome.folders)) / max(len(landed), 1)
        resumed = sorted({s.resumed_from for s in starts if s.resumed_from})
        total += len(outcome.differences)
        print(f"| {outcome.command.name} | {len(landed)} | {', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))} | {len(starts)} | "
              f"{', '.join(f'{k}: {n}' for k, n in sorted(exits.items()))} | {'; '.join(resumed)[:60] or '-'} | "
              f"{outcome.reference_seconds:.1f} | {lost:.1f} | {len(outcome.differences)} |")
    for outcome in outcomes:
        for difference in outcome.differences:
            print(f"difference: {difference}")
    faults = sum(s.landed for o in outcomes for f in o.folders for s in f["starts"])
    print(f"faults injected: {faults}")
    print(f"differences from the uninterrupted run: {total}")
    return 1 if total else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=50,
                        help="faults in all, spread evenly over the commands (fewer faults than commands: that many commands, drawn by the seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commands", help="comma-separated names, each optionally NAME:FAULTS (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="print the command names and exit")
    parser.add_argument("--work", default="runs/chaos", help="folder for references, chaos folders and chaos.log")
    parser.add_argument("--shards", help="a digits dataset folder to use (default: WORK/shards, written once)")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    shards = Path(args.shards).resolve() if args.shards else work / "shards"
    available = commands(work, shards)
    if args.list:
        print("\n".join(available))
        return 0
    wanted = [item.partition(":") for item in args.commands.split(",")] if args.commands else [(n, "", "") for n in available]
    unknown = [name for name, _, _ in wanted if name not in available]
    if unknown:
        parser.error(f"unknown command {unknown[0]!r}; --list prints the names")
    rng = random.Random(args.seed)
    if len(wanted) > args.faults and not any(count for _, _, count in wanted):  # fewer faults than commands: a sample of them
        wanted = sorted(rng.sample(wanted, args.faults), key=wanted.index)
    chosen = [available[name] for name, _, _ in wanted]
    even = [args.faults // len(chosen) + (i < args.faults % len(chosen)) for i in range(len(chosen))]
    share = [int(count) if count else default for (_, _, count), default in zip(wanted, even)]
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    setup(work, shards, {need for c in chosen for need in c.needs})
    outcomes = []
    with open(work / "chaos.log", "w") as log:
        for cmd, faults in zip(chosen, share):
            outcome = run_chaos(cmd, work, faults, rng, log)
            landed = sum(s.landed for f in outcome.folders for s in f["starts"])
            print(f"chaos: {cmd.name}: {landed} faults, {sum(len(f['starts']) for f in outcome.folders)} starts, "
                  f"{len(outcome.differences)} differences", flush=True)
            outcomes.append(outcome)
    return report(outcomes, args.seed, time.time() - started)


if __name__ == "__main__":
    sys.exit(main())
