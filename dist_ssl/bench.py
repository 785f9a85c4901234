"""`dist-ssl bench PROTOCOL.yaml`: test accuracy per method and label count as mean ± std over label
draws, every run an ordinary resumable `dist-ssl train`.

    output_dir/
      shards/{source}-{L}pc-draw{D}/   `dist-ssl shards write SOURCE --labels-per-class L --seed D`, written once
      runs/{method}-{L}pc-draw{D}/     one `dist-ssl train` run folder (config.yaml, checkpoints/, results.json)
      bench.md, bench.csv, bench.png   the table, rewritten after every finished run

A run is done when its `results.json` is there (with `train.finetune`, once it holds the fine-tuned
result); a rerun skips it after checking that its `config.yaml` is the config this protocol asks for
now. An interrupted run resumes from its own newest committed checkpoint, as `dist-ssl train` does in
any run folder. SIGTERM, SIGUSR1 or Ctrl-C to the bench reaches the run going on, which commits a
checkpoint; the bench then exits 75 like `train`, and the same command resumes it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dist_ssl.errors import UserError

# The bench places every run's folder and dataset itself: a protocol's overrides may not.
OWNED_KEYS = ("train.output_dir", "data.shards")
METHOD_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # it names a folder


@dataclass
class Protocol:
    """What one bench measures; the keys of PROTOCOL.yaml."""

    source: str  # any `dist-ssl shards write` source
    labels_per_class: list[int]  # one run set per value
    draws: list[int]  # the --seed of `shards write`: which points become labels (and, for moons, the points)
    methods: dict[str, str]  # name (a folder name) -> config file
    output_dir: str
    processes: int = 1  # 1: plain `dist-ssl train`; N: `accelerate launch` with N processes, as `dist-ssl demo`
    overrides: list[str] = field(default_factory=list)  # key=value applied to every run

    def __post_init__(self):
        from dist_ssl.data.sources import SOURCES

        if self.source not in SOURCES:
            raise UserError(f"key 'source' names no `shards write` source: {self.source!r}{_closest(self.source, SOURCES)}; "
                            f"choose from: {', '.join(SOURCES)}")
        for key, low in (("labels_per_class", 1), ("draws", 0)):
            values = getattr(self, key)
            _check(bool(values), key, "must list at least one value")
            _check(min(values) >= low, key, f"must hold integers >= {low}; got {values}")
            _check(len(set(values)) == len(values), key, f"lists a value twice: {values}")
        _check(bool(self.methods), "methods", "must name at least one method (name: config file)")
        for name in self.methods:
            _check(bool(METHOD_NAME.fullmatch(name)), "methods", f"name {name!r} must be letters, digits, '_', '-' or '.' (it names a folder)")
        _check(self.processes >= 1, "processes", f"must be >= 1; got {self.processes}")
        _check(bool(self.output_dir.strip()), "output_dir", "must not be empty")
        for item in self.overrides:
            key, sep, _ = item.partition("=")
            _check(bool(sep and key.strip()), "overrides", f"item {item!r} is not of the form key=value")
            _check(key.strip() not in OWNED_KEYS, "overrides", f"may not set {key.strip()}: the bench places each run's folder and shards")


@dataclass(frozen=True)
class Run:
    method: str
    labels_per_class: int
    draw: int

    @property
    def name(self) -> str:
        return f"{self.method}-{self.labels_per_class}pc-draw{self.draw}"


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"key '{key}' {message}")


def _closest(name: str, choices) -> str:
    import difflib

    near = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


# ----------------------------------------------------------------------------------------------
# the protocol


def load_protocol(path: str | Path) -> Protocol:
    """PROTOCOL.yaml -> a checked Protocol whose every method config loads with the overrides, so a
    typo fails now and not hours into the bench."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"protocol file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"protocol {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        if not isinstance(data, dict):
            raise UserError(f"must be a mapping of keys ({', '.join(f.name for f in dataclasses.fields(Protocol))}), "
                            f"not {type(data).__name__}")
        protocol = _parse(data)
        for name in protocol.methods:
            run_config(protocol, Run(name, protocol.labels_per_class[0], protocol.draws[0]))
    except UserError as exc:
        raise UserError(f"protocol {path}: {exc}") from None
    return protocol


def _parse(data: dict) -> Protocol:
    # The config module's helpers: an unknown key names the closest valid one, a value of another
    # type names the key and the type, with the same words as a training config's errors.
    from dist_ssl.config import _coerce, _unknown_key

    hints = typing.get_type_hints(Protocol)
    fields = {f.name: f for f in dataclasses.fields(Protocol)}
    for key in data:
        if key not in fields:
            raise UserError(str(_unknown_key(str(key), "", Protocol)).replace("config key", "key"))
    missing = [name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}")
    values = {}
    for key, value in data.items():
        if key == "methods":
            values[key] = _methods(value)
            continue
        if value is None:  # `overrides:` with nothing after it is no override; anything else needs a value
            if key != "overrides":
                raise UserError(f"key '{key}' has no value")
            value = []
        try:
            values[key] = _coerce(value, hints[key], key)
        except UserError as exc:
            raise UserError(str(exc).replace("config key", "key")) from None
    return Protocol(**values)


def _methods(value) -> dict[str, str]:
    if not isinstance(value, dict):
        raise UserError(f"key 'methods' maps each method's name to its config file (fixmatch: configs/digits/fixmatch.yaml); got {value!r}")
    for name, file in value.items():
        if not isinstance(file, str):
            raise UserError(f"key 'methods.{name}' must be a config file path; got {file!r}")
    return {str(name): file for name, file in value.items()}


def shard_dir(protocol: Protocol, labels_per_class: int, draw: int) -> Path:
    return Path(protocol.output_dir) / "shards" / f"{protocol.source}-{labels_per_class}pc-draw{draw}"


def run_dir(protocol: Protocol, run: Run) -> Path:
    return Path(protocol.output_dir) / "runs" / run.name


def run_arguments(protocol: Protocol, run: Run) -> list[str]:
    """`dist-ssl train` arguments of one run: the method's config, the protocol's overrides, then the
    run's own folder and shards (last: they win)."""
    shards = shard_dir(protocol, run.labels_per_class, run.draw)
    return ["train", protocol.methods[run.method], *protocol.overrides, f"train.output_dir={run_dir(protocol, run)}", f"data.shards={shards}"]


def run_config(protocol: Protocol, run: Run):
    """The resolved config that `dist-ssl train` will run (and saves as the run's config.yaml)."""
    from dist_ssl.config import load_config

    file = protocol.methods[run.method]
    if not Path(file).is_file():
        raise UserError(f"methods.{run.method}: config file not found: {file}")
    try:
        return load_config(file, run_arguments(protocol, run)[2:])
    except UserError as exc:
        raise UserError(f"methods.{run.method} ({file}) with the overrides: {exc}") from None


def plan(protocol: Protocol) -> list[Run]:
    """Every run, a label count and draw at a time, so each dataset is written just before its first run."""
    return [Run(method, labels, draw) for labels in protocol.labels_per_class for draw in protocol.draws for method in protocol.methods]


# ----------------------------------------------------------------------------------------------
# running


def finished_results(protocol: Protocol, run: Run) -> dict | None:
    """The run's results.json when the run is done, else None. A done run trained with another config
    than the protocol now asks for is refused: its figure would be mixed into the table unnoticed."""
    folder = run_dir(protocol, run)
    results_file = folder / "results.json"
    if not results_file.is_file():
        return None
    results = json.loads(results_file.read_text())
    cfg = run_config(protocol, run)
    if cfg.train.finetune.epochs > 0 and "finetuned" not in results:
        return None  # interrupted in its fine-tune stage, which resumes like the rest
    from dist_ssl.config import to_dict
    from dist_ssl.pipeline import _first_difference  # the pipeline's check of its own folder, reused

    saved_file = folder / "config.yaml"
    saved = yaml.safe_load(saved_file.read_text()) if saved_file.is_file() else {}
    difference = _first_difference(saved, to_dict(cfg))
    if difference:
        raise UserError(f"{folder} was trained with another config ({difference}): use another output_dir, "
                        f"or remove that run folder to train it again")
    return results


def accuracy(results: dict) -> float:
    """The test accuracy of the run's final model: the fine-tuned one where the run fine-tunes."""
    return (results.get("finetuned") or results)["test_accuracy"]


def wall_seconds(results: dict) -> float:
    return results["wall_seconds"] + (results.get("finetuned") or {}).get("wall_seconds", 0.0)


def _write_shards(protocol: Protocol, labels_per_class: int, draw: int) -> Path:
    from dist_ssl.data.shards.writer import write_dataset
    from dist_ssl.data.sources import load_source

    out = shard_dir(protocol, labels_per_class, draw)
    if (out / "test" / "manifest.json").is_file():  # write_dataset renames a finished folder into place
        return out
    _say(f"bench: writing {protocol.source} shards, {labels_per_class} labels per class, draw {draw} -> {out}")
    # What `dist-ssl shards write SOURCE --labels-per-class L --seed D` writes, with its defaults.
    write_dataset(load_source(protocol.source, seed=draw), out, labels_per_class, seed=draw)
    return out


class _Signals:
    """The bench owns its runs' signals: each run gets a session of its own, and SIGTERM, SIGUSR1 or
    SIGINT to the bench reach it once, as SIGTERM: it commits a checkpoint and exits, then the bench
    stops. Once: a signal to the whole process group would reach `accelerate launch` twice, and its
    second SIGTERM cuts short the shutdown the first began. SIGTERM: `accelerate launch` forwards it
    to every rank (SIGUSR1 would kill the launcher alone); `dist-ssl train` treats them alike."""

    WATCHED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.received: str | None = None
        self.previous = {}

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in self.WATCHED}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        self.received = signal.Signals(signum).name
        self._forward()

    def _forward(self):
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self, command: list[str], env: dict) -> int:
        self.child = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            if self.received:  # came between the check before the launch and the line above
                self._forward()
            return self.child.wait()
        finally:
            self.child = None


def run_bench(protocol: Protocol, protocol_path: str | Path) -> int:
    from dist_ssl.demo import launch_command
    from dist_ssl.engine.lock import RunLock
    from dist_ssl.engine.preemption import REQUEUE_EXIT_CODE

    runs = plan(protocol)
    # One bench per output_dir. Not the lock of output_dir itself: each run locks its own folder
    # inside it, which a lock on a folder above refuses. The shards are the bench's own writes.
    lock = RunLock(Path(protocol.output_dir) / "shards")
    taken_over = lock.acquire()
    if taken_over:
        print(f"dist-ssl: {taken_over}", file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        # Every finished run checked first: a run of another config is refused before hours of others.
        finished = {run: results for run in runs if (results := finished_results(protocol, run)) is not None}
        with _Signals() as signals:
            for index, run in enumerate(runs, 1):
                head = f"bench: run {index}/{len(runs)} {run.method} labels={run.labels_per_class} draw={run.draw}"
                if run in finished:
                    _say(f"{head}: done before (test accuracy {accuracy(finished[run]) * 100:.2f}%)")
                    continue
                code = None
                if not signals.received:
                    _write_shards(protocol, run.labels_per_class, run.draw)
                    folder = run_dir(protocol, run)
                    _say(f"{head} -> {folder}{' (resuming)' if (folder / 'checkpoints').is_dir() else ''}")
                    code = signals.run(launch_command(protocol.processes, run_arguments(protocol, run)), env)
                if signals.received:
                    during = f"during run {index}/{len(runs)} ({run.name}, exit {code})" if code is not None else f"before run {index}/{len(runs)}"
                    print(f"dist-ssl: bench stopped by {signals.received} {during}; run the same command again to resume "
                          f"(exit {REQUEUE_EXIT_CODE})", file=sys.stderr, flush=True)
                    return REQUEUE_EXIT_CODE
                if code != 0:
                    raise UserError(f"{head} failed with exit code {code} (its log is above); fix it and rerun the same command: "
                                    f"finished runs are kept")
                finished[run] = json.loads((run_dir(protocol, run) / "results.json").read_text())
                write_tables(protocol, protocol_path, finished)
        paths = write_tables(protocol, protocol_path, finished)  # also when every run was done before
    finally:
        lock.release()
    _say(Path(paths["md"]).read_text())
    _say(f"bench: wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _say(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------------------------
# the table


def collect(protocol: Protocol, finished: dict[Run, dict]) -> list[dict]:
    """One row per (method, labels per class): each draw's accuracy and wall seconds (None while the
    run is not done), mean and sample std over the draws done."""
    rows = []
    for method in protocol.methods:
        for labels in protocol.labels_per_class:
            done = {draw: finished[run] for draw in protocol.draws if (run := Run(method, labels, draw)) in finished}
            accuracies = [accuracy(r) for r in done.values()]
            rows.append({
                "method": method, "labels_per_class": labels,
                "accuracy": {d: accuracy(done[d]) if d in done else None for d in protocol.draws},
                "wall_seconds": {d: wall_seconds(done[d]) if d in done else None for d in protocol.draws},
                "mean": statistics.mean(accuracies) if accuracies else None,
                "std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
                "done": len(accuracies),
            })
    return rows


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.2f}"


def table_cells(protocol: Protocol, rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The table as text cells, the same for bench.md and bench.png."""
    header = ["method", "labels per class", "mean ± std", *(f"draw {d}" for d in protocol.draws), "wall s per run"]
    cells = []
    for row in rows:
        spread = f" ± {row['std'] * 100:.2f}" if row["std"] is not None else ""
        walls = ", ".join("—" if s is None else f"{s:.0f}" for s in row["wall_seconds"].values())
        cells.append([row["method"], str(row["labels_per_class"]), _percent(row["mean"]) + spread,
                      *(_percent(a) for a in row["accuracy"].values()), walls])
    return header, cells


def write_tables(protocol: Protocol, protocol_path: str | Path, finished: dict[Run, dict]) -> dict[str, Path]:
    """bench.md, bench.csv and bench.png of the finished runs' results."""
    from dist_ssl.files import atomic_write_text

    out = Path(protocol.output_dir)
    rows = collect(protocol, finished)
    done = sum(row["done"] for row in rows)
    total = len(plan(protocol))
    header, cells = table_cells(protocol, rows)
    title = f"bench: {protocol.source}, {protocol.processes} process{'es' if protocol.processes > 1 else ''}"
    overrides = ", ".join(f"`{o}`" for o in protocol.overrides) or "none"
    lines = [
        f"# {title}", "",
        f"Protocol `{protocol_path}`, overrides: {overrides}; {done} of {total} runs done.",
        "Test accuracy (%) of each run's evaluated model (its EMA where the config keeps one: results.json's",
        f"`test_accuracy`), mean ± sample std over draws {', '.join(map(str, protocol.draws))} (the `--seed` of",
        "`shards write`), then each draw; wall s: each run's training wall clock, draw by draw.", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in cells),
    ]
    paths = {"md": out / "bench.md", "csv": out / "bench.csv", "png": out / "bench.png"}
    atomic_write_text(paths["md"], "\n".join(lines) + "\n")
    atomic_write_text(paths["csv"], _csv_text(protocol, rows))
    _draw(paths["png"], title, header, cells)
    return paths


def _csv_text(protocol: Protocol, rows: list[dict]) -> str:
    """Fractions at full precision, as in results.json; an empty cell where a run is not done."""
    import io

    def cell(value):
        return "" if value is None else repr(value)

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["method", "labels_per_class", "draws_done", "mean_test_accuracy", "std_test_accuracy",
                     *(f"test_accuracy_draw{d}" for d in protocol.draws), *(f"wall_seconds_draw{d}" for d in protocol.draws)])
    for row in rows:
        writer.writerow([row["method"], row["labels_per_class"], row["done"], cell(row["mean"]), cell(row["std"]),
                         *(cell(a) for a in row["accuracy"].values()), *(cell(s) for s in row["wall_seconds"].values())])
    return text.getvalue()


def _draw(path: Path, title: str, header: list[str], cells: list[list[str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only
    from matplotlib import pyplot as plt

    from dist_ssl.files import atomic_write

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(header)), 0.9 + 0.32 * (len(cells) + 1)))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(list(range(len(header))))
    for column in range(len(header)):
        table[0, column].set_text_props(weight="bold")
    ax.set_title(f"{title}: test accuracy (%)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
