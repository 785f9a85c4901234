"""`dist-ssl` command line: shards, train, evaluate, report, pseudo-label, select, pipeline, bench, demo.

Every user error ends as one line on stderr (`dist-ssl: error: ...`) and exit code 2, a disk that
refuses a write included. `train`, `pseudo-label`, `select` and `pipeline` stopped by SIGTERM/SIGUSR1
commit their work so far, leave a `PREEMPTED` file in their folder (naming the pipeline's stage) and
exit with 75: run the same command to resume. Commands that write a run folder hold its lock
(engine/lock.py). Under `accelerate launch`, errors every rank
would raise alike are printed by rank 0 only.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from dist_ssl.errors import UserError

PREEMPTED = "PREEMPTED"  # in a run folder: the last session stopped on a signal, the same command resumes it
_left_process_group = False  # set by leave_process_group: exit_process ends the process with os._exit


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _size(text: str) -> int:
    """Bytes: 500000000, 500M, 1G, 1.5GB."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number = text.strip().upper().removesuffix("B").removesuffix("I")
    suffix = number[-1:] if number[-1:] in units else ""
    try:
        return int(float(number[: len(number) - len(suffix)]) * units[suffix])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 1G)") from None


def _shards_write(args) -> int:
    from dist_ssl.data.shards.writer import write_dataset
    from dist_ssl.data.sources import load_source

    source = load_source(args.source, path=args.path, seed=args.seed, download=args.download)
    manifests = write_dataset(
        source, args.out, args.labels_per_class, args.seed, args.test_fraction, args.maxcount, maxsize=args.maxsize,
        encoding=args.encoding, quality=args.quality, resize=args.resize, channels=args.channels, workers=args.workers,
        source_path=args.path,
    )
    for split, manifest in manifests.items():
        print(f"{split:>9}: {manifest['num_samples']:>7} samples in {len(manifest['shards'])} shard(s) -> {args.out}/{split}")
        if manifest.get("skipped"):
            print(f"{'':>9}  {len(manifest['skipped'])} unreadable image(s) skipped (listed in its manifest.json)")
    return 0


def _shards_verify(args) -> int:
    from dist_ssl.data.shards.verify import one_torch_thread, verify

    one_torch_thread()
    reports = verify(args.folder, args.workers, allow_pipe=args.allow_pipe)
    bad = [r for r in reports if r.problems]
    for report in reports:
        if not report.problems:
            print(f"{report.name}: ok ({report.samples} samples)")
        for problem in report.problems:
            print(f"{report.name}: {problem}")
    if bad:
        raise UserError(f"{len(bad)} of {len(reports)} checked files in {args.folder} have problems (listed above)")
    print(f"all {len(reports)} shards in {args.folder} match their manifests")
    return 0


def _resumable(folder: str | Path, work) -> int:
    """Run `work()`, the job of a command that writes `folder`, under the folder's run lock. A
    SIGTERM/SIGUSR1 (preemption.install() was called first) ends it with its work so far committed,
    a PREEMPTED marker in the folder, one line, and exit 75: the same command resumes it."""
    from dist_ssl.engine import preemption
    from dist_ssl.engine.lock import run_lock
    from dist_ssl.files import atomic_write_json, writing

    run = Path(folder)
    main = int(os.environ.get("RANK", "0")) == 0
    with run_lock(run):
        marker = run / PREEMPTED
        if main and marker.exists():  # this session decides anew how the run ends
            with writing(marker):
                marker.unlink()
        try:
            work()
        except preemption.Preempted as stopped:
            if main:
                # What a requeue wrapper reads whatever the launcher made of the ranks' exit 75.
                atomic_write_json(marker, stopped.marker())
                print(f"dist-ssl: {stopped} (exit {preemption.REQUEUE_EXIT_CODE})", file=sys.stderr, flush=True)
            return preemption.REQUEUE_EXIT_CODE
    return 0


def _train(args) -> int:
    from dist_ssl.engine import preemption

    # SIGTERM/SIGUSR1 from here to the exit: checkpoint at the next step boundary and exit 75. First,
    # so that a signal during the seconds of imports below does not kill the process.
    preemption.install()
    from dist_ssl.config import load_config
    from dist_ssl.engine.loop import train

    cfg = load_config(args.config, args.overrides)
    return _resumable(cfg.train.output_dir, lambda: train(cfg))  # the fine-tune stage writes into it too


def _evaluate(args) -> int:
    from dist_ssl.engine.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.shards, args.split, args.batch_size, args.weights, allow_pipe=args.allow_pipe)
    if int(os.environ.get("RANK", "0")) == 0:
        line = f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  ({result['samples']} samples, {result['weights']} weights, {result['checkpoint']})"
        if args.json:  # stdout is the JSON alone, for `| jq` and json.load; the line goes to stderr
            print(line, file=sys.stderr)
            print(json.dumps(result))
        else:
            print(line)
    return 0


def _report_run(args) -> int:
    from dist_ssl.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out, args.shards)}")
    return 0


def _pseudo_label(args) -> int:
    from dist_ssl.engine import preemption

    preemption.install()  # a signal: finish the current output shard, exit 75
    from dist_ssl.config import InferenceConfig
    from dist_ssl.inference.pseudo_label import pseudo_label

    cfg = InferenceConfig(top_p=args.top_p, batch_size=args.batch_size, workers=args.workers, weights=args.weights, precision=args.precision,
                          max_bad_fraction=args.max_bad_fraction, allow_pipe=args.allow_pipe)
    return _resumable(args.out, lambda: pseudo_label(args.checkpoint, args.shards, args.out, cfg))


def _select(args) -> int:
    from dist_ssl.engine import preemption

    preemption.install()  # a signal: finish the current output shard, exit 75
    from dist_ssl.config import SelectConfig
    from dist_ssl.inference.select import select

    cfg = SelectConfig(policy=args.policy, top_k=args.top_k, threshold=args.threshold, sample_rate=args.sample_rate,
                       soft=args.soft, maxcount=args.maxcount)
    return _resumable(args.out, lambda: select(args.predictions, args.out, cfg, args.include_labeled, allow_pipe=args.allow_pipe))


def _pipeline(args) -> int:
    from dist_ssl.engine import preemption

    preemption.install()  # a signal: the current stage stops as it would alone, exit 75, the marker names the stage
    from dist_ssl.config import load_pipeline_config
    from dist_ssl.pipeline import run_pipeline

    cfg = load_pipeline_config(args.config, args.overrides)
    return _resumable(cfg.output_dir, lambda: run_pipeline(cfg))  # every stage lives under output_dir


def _at_least(low: int | float, kind=int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {kind.__name__}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}; got {value}")
        return value

    return parse


def _fraction(low_open: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a number; got {text!r}") from None
        if not (0 < value <= 1 if low_open else 0 <= value <= 1):
            raise argparse.ArgumentTypeError(f"must be in {'(0' if low_open else '[0'}, 1]; got {value}")
        return value

    return parse


def _bench(args) -> int:
    from dist_ssl.bench import load_protocol, run_bench

    return run_bench(load_protocol(args.protocol), args.protocol)


def _demo(args) -> int:
    from dist_ssl.demo import run_demo

    return run_demo(args.out, args.shards, args.processes)


ALLOW_PIPE_HELP = ("open shard URLs of the manifests that run a command (pipe:), or lie outside the split folder; "
                   "refused by default: a dataset folder from someone else must not run anything")


def build_parser() -> argparse.ArgumentParser:
    from dist_ssl.data.shards.codec import ENCODINGS
    from dist_ssl.data.shards.writer import DEFAULT_MAXCOUNT, DEFAULT_MAXSIZE
    from dist_ssl.data.sources import SOURCES

    parser = _Parser(prog="dist-ssl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    shards = commands.add_parser("shards", help="write WebDataset shards of a source, or verify them")
    shard_commands = shards.add_subparsers(dest="shards_command", required=True, parser_class=_Parser)
    write = shard_commands.add_parser("write", help="class-balanced labeled, unlabeled and test shards + manifests")
    write.add_argument("source", help=" | ".join(SOURCES))
    write.add_argument("--out", required=True, help="dataset folder to create (must not exist or be empty)")
    write.add_argument("--labels-per-class", type=int, help="labeled samples per class (sources with labels)")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--path", help="where the source's files are (or go, with --download)")
    write.add_argument("--download", action="store_true", help="fetch missing files through torchvision into --path")
    write.add_argument("--test-fraction", type=float, default=0.3, help="held-out test share for sources without a test split")
    write.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT, help="samples per shard at most")
    write.add_argument("--maxsize", type=_size, default=DEFAULT_MAXSIZE, help="bytes per shard, about (e.g. 500M, 1G)")
    write.add_argument("--encoding", choices=ENCODINGS, default="png", help="how images are stored (raw: uint8 .npy)")
    write.add_argument("--quality", type=int, default=95, help="jpg quality")
    write.add_argument("--resize", type=int, help="shorter side to N pixels, then the centre N x N square")
    write.add_argument("--channels", type=int, choices=(1, 3), help="convert images to grey (1) or RGB (3)")
    write.add_argument("--workers", type=int, default=1, help="processes that read and encode (output is the same for any number)")
    write.set_defaults(func=_shards_write)
    check = shard_commands.add_parser("verify", help="check every shard against its manifest (hash, count, decoding, labels)")
    check.add_argument("folder", help="dataset folder, or one split's folder")
    check.add_argument("--workers", type=int, default=1, help="processes checking shards in parallel")
    check.add_argument("--allow-pipe", action="store_true", help=ALLOW_PIPE_HELP)
    check.set_defaults(func=_shards_verify)

    train = commands.add_parser("train", help="train a method (also under `accelerate launch -m dist_ssl train`)")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("evaluate", help="accuracy and loss of a checkpoint on a split")
    evaluate.add_argument("checkpoint", help="step-N folder, or a run folder (its newest committed checkpoint)")
    evaluate.add_argument("--shards", required=True, help="dataset folder, or one split's folder")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto")
    evaluate.add_argument("--json", action="store_true", help="print the result (with the confusion counts) as JSON on stdout; the summary line goes to stderr")
    evaluate.add_argument("--allow-pipe", action="store_true", help=ALLOW_PIPE_HELP)
    evaluate.set_defaults(func=_evaluate)

    report = commands.add_parser("report", help="PNG curves, a 3x3 grid of test predictions and report.md of a run")
    report.add_argument("run_dir", help="a run folder (train.output_dir)")
    report.add_argument("--out", help="folder for report.md and the PNGs (default: RUN_DIR/report)")
    report.add_argument("--shards", help="dataset folder or test split for the predictions (default: the run's data.shards)")
    report.set_defaults(func=_report_run)

    label = commands.add_parser("pseudo-label", help="predict every sample of a pool once (also under `accelerate launch`)")
    label.add_argument("checkpoint", help="step-N folder, or a run folder (its newest committed checkpoint)")
    label.add_argument("--shards", required=True, help="the pool: an unlabeled split folder (or a dataset folder: its unlabeled/)")
    label.add_argument("--out", required=True, help="folder of the predictions; rerun the same command to resume it")
    label.add_argument("--top-p", type=_at_least(1), default=10, help="classes kept per sample, with probabilities (10)")
    label.add_argument("--batch-size", type=_at_least(1), default=256, help="per process (256)")
    label.add_argument("--workers", type=_at_least(0), default=2, help="decoding processes per rank (2)")
    label.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto")
    label.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="auto: bf16 on GPUs (fp16 where bf16 is missing), fp32 on CPU")
    label.add_argument("--max-bad-fraction", type=float, default=0.01,
                       help="corrupt samples are skipped and listed; a reader fails past this fraction (0.01)")
    label.add_argument("--allow-pipe", action="store_true", help=ALLOW_PIPE_HELP)
    label.set_defaults(func=_pseudo_label)

    choose = commands.add_parser("select", help="pseudo-labeled samples -> a labeled split that `train` reads (data.labeled=DIR)")
    choose.add_argument("predictions", help="a folder written by `dist-ssl pseudo-label`")
    choose.add_argument("--out", required=True, help="the split folder to write; rerun the same command to resume it")
    choose.add_argument("--policy", choices=("top_k", "threshold", "sample_rate", "all"), default="top_k")
    choose.add_argument("--top-k", type=_at_least(1), default=16000, help="top_k: samples per class (16000)")
    choose.add_argument("--threshold", type=_fraction(low_open=False), default=0.95, help="threshold: minimum top-1 probability (0.95)")
    choose.add_argument("--sample-rate", type=_fraction(low_open=True), default=0.1, help="sample_rate: fraction of each predicted class kept (0.1)")
    choose.add_argument("--soft", action="store_true", help="keep the class probabilities as soft targets")
    choose.add_argument("--include-labeled", metavar="SPLIT", help="also copy this labeled split in (self-training)")
    choose.add_argument("--maxcount", type=_at_least(1), default=10000, help="samples per written shard (10000)")
    choose.add_argument("--allow-pipe", action="store_true", help=ALLOW_PIPE_HELP)
    choose.set_defaults(func=_select)

    pipe = commands.add_parser("pipeline", help="teacher -> pseudo-labels -> top-K -> student -> fine-tune (resumable)")
    pipe.add_argument("config", help="pipeline YAML (see configs/pipelines/)")
    pipe.add_argument("overrides", nargs="*", help="key=value overrides, e.g. teacher.train.epochs=5")
    pipe.set_defaults(func=_pipeline)

    bench = commands.add_parser("bench", help="every method x labels per class x label draw: mean ± std of test accuracy (resumable)")
    bench.add_argument("protocol", help="protocol YAML (see configs/bench/)")
    bench.set_defaults(func=_bench)

    demo = commands.add_parser("demo", help="digits, 5 labels per class: supervised vs pseudo_label vs fixmatch")
    demo.add_argument("--out", help="runs go to OUT/<method> (default: runs/demo-<date-time>)")
    demo.add_argument("--shards", default="shards/digits-5pc")
    demo.add_argument("--processes", type=int, default=2)
    demo.set_defaults(func=_demo)
    return parser


def _report(exc: UserError) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or getattr(exc, "rank_local", False):
        prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"dist-ssl: error: {prefix}{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr, flush=True)


# What a disk says when it refuses a write; anything else stays a bug with its traceback.
DISK_REFUSED = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def run() -> None:
    """The `dist-ssl` and `python -m dist_ssl` entry point: the process, then the command."""
    from dist_ssl.engine.allocator import request_huge_pages

    request_huge_pages()
    try:
        main()
    finally:
        # The command is over: a SIGTERM/SIGUSR1 from here on (Python gives them their default action
        # back while it shuts down) must not turn the exit status of finished work into a signal's.
        # Here, not in main(): a caller of main() in its own process (tests) keeps its signals.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
        ended = sys.exc_info()[1]
        if isinstance(ended, SystemExit):
            exit_process(ended.code)


def leave_process_group(finished: bool) -> None:
    """Destroy this process's process group, if it has one (accelerate launch warns otherwise). With
    `finished` (this rank succeeded, so every rank is on its way here) the ranks meet at a barrier
    and leave together; a failed rank leaves alone: the others are not coming, torchrun stops them.
    End the process with `exit_process` then."""
    global _left_process_group
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
        _left_process_group = True


def exit_process(code: int) -> NoReturn:
    """End the process with `code`: `sys.exit`, or, once `leave_process_group` destroyed a group,
    the atexit handlers then `os._exit`, skipping the interpreter's finalization.

    Why: destroy_process_group does not join gloo's worker threads, and one of them can still hold a
    finished collective (its AsyncWork) when the main thread is done. Dropping it releases tensors
    whose Python objects need the GIL; once the interpreter is finalizing, Python ends that thread
    from inside a C++ destructor and the rank aborts with "terminate called without an active
    exception" after its work was committed (2 runs in 73 of a 2-process pipeline test under CPU
    contention, none in 80 since; the core: ProcessGroupGloo::AsyncWork::~AsyncWork ->
    decref_pyobject -> take_gil -> pthread_exit -> std::terminate). The atexit handlers run first,
    with the interpreter whole: they flush logging and stop multiprocessing children as a normal
    exit would.
    """
    if not _left_process_group:
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    from dist_ssl.engine import watchdog
    from dist_ssl.files import os_error

    watchdog.install()  # a rank of torchrun ends with it
    code = 0
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args) or 0
    except UserError as exc:
        _report(exc)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        # A write outside dist_ssl.files (TensorBoard's event files, a tar being written) hit a full
        # or read-only disk: the same one line as the writes that dist_ssl.files makes.
        error = os_error(exc)
        if error is None or error.errno not in DISK_REFUSED:
            raise
        _report(UserError(f"cannot write {error.filename or 'the output folder'}: {error.strerror}"))
        code = 2
    finally:
        leave_process_group(finished=code == 0 and sys.exc_info()[0] is None)
    sys.exit(code)
