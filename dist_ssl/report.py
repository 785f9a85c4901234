"""`dist-ssl report RUN_DIR`: a finished (or running) run's story as PNGs and one report.md.

Curves are read back from the run's TensorBoard event files with tensorboard's own reader, so the
report shows exactly what TensorBoard shows (a resumed run's purged steps included); evaluations
missing there (a run folder copied without tb/) come from the newest checkpoint's history. The 3x3
grid shows the newest committed checkpoint's predictions on the first test samples, as
`dist-ssl evaluate` would compute them.
"""

from __future__ import annotations

import json
from pathlib import Path

from dist_ssl.errors import UserError

# (file, title, [(tag, label)], y label): one PNG per question a reader asks of a run.
CURVES = (
    ("losses.png", "training losses", [("train/loss", "total"), ("train/loss_labeled", "labeled"),
                                       ("train/loss_unlabeled", "unlabeled")], "loss"),
    ("test.png", "test split", [("eval/accuracy", "accuracy"), ("eval/loss", "loss")], None),
    ("pseudo_labels.png", "pseudo-labels on the unlabeled batch", [
        ("train/mask_rate", "mask rate (share used)"), ("train/pseudo_label_accuracy", "accuracy (hidden truth)"),
        ("train/pseudo_label_accuracy_used", "accuracy of the used ones")], "fraction"),
)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's TensorBoard folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = run_dir / "tb"
    if not tb.is_dir():
        return {}
    events = EventAccumulator(str(tb), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _history(checkpoint_dir: Path) -> list[dict]:
    from dist_ssl.engine import checkpoint

    training = checkpoint_dir / "training.pt"
    return list(checkpoint.load_file(training).get("state", {}).get("history", [])) if training.is_file() else []


def _plot(path: Path, title: str, series: list[tuple[str, list[tuple[int, float]]]], ylabel: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in a container
    from matplotlib import pyplot as plt

    if ylabel is None:  # accuracy and loss differ in scale: one panel each
        fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.6), squeeze=False)
        for ax, (label, points) in zip(axes[0], series):
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
            ax.set_title(f"{title}: {label}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, points in series:
            ax.plot(*zip(*points), label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prediction_grid(run_dir: Path, shards: str | None, out: Path) -> tuple[Path | None, str]:
    """A 3x3 grid of the first test samples with the newest checkpoint's prediction (green when
    right, red when wrong) and the truth. Returns (PNG or None, a line for report.md)."""
    import numpy as np
    import torch

    from dist_ssl.data.shards.manifest import load_manifest
    from dist_ssl.data.transforms import build_views
    from dist_ssl.engine.evaluate import check_matches, first_samples, load_network

    loaded = load_network(run_dir)
    cfg = loaded.cfg
    if shards is not None:
        root = Path(shards)
        test_dir = root if (root / "manifest.json").is_file() else root / "test"
    else:
        if not cfg.data.shards:
            raise UserError("the run's config has no data.shards; pass --shards DIR")
        test_dir = Path(cfg.data.test) if Path(cfg.data.test).is_absolute() else Path(cfg.data.shards) / cfg.data.test
    if not (test_dir / "manifest.json").is_file():
        raise UserError(f"test split not found at {test_dir} (the run's data.shards, relative to where it was trained); pass --shards DIR")
    manifest = load_manifest(test_dir)
    check_matches(manifest, loaded.meta)
    if manifest.kind == "vector":
        return None, f"(no prediction grid: {manifest.data.get('source', 'this dataset')} samples are vectors, not images)"
    raw = first_samples(manifest, 9)
    plain = build_views(manifest.kind, manifest.input_shape, loaded.meta["mean"], loaded.meta["std"], cfg.data.augment)["plain"]
    with torch.no_grad():
        predicted = loaded.net(plain.batch(raw["inputs"]["plain"])).argmax(dim=1)

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = manifest.data.get("class_names") or [str(i) for i in range(manifest.num_classes)]
    fig, axes = plt.subplots(3, 3, figsize=(6.5, 7))
    right = 0
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(predicted):
            continue
        image = raw["inputs"]["plain"][i].numpy()
        image = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        guess, truth = int(predicted[i]), int(raw["label"][i])
        right += guess == truth
        ax.set_title(f"{names[guess]} (true {names[truth]})", color="green" if guess == truth else "red", fontsize=9)
    step = loaded.meta["step"]
    fig.suptitle(f"test predictions, step {step} ({'EMA' if loaded.ema else 'raw'} weights)")
    fig.tight_layout()
    path = out / "predictions.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, f"{right} of {len(predicted)} right: the first test samples, newest checkpoint {loaded.folder.name}."


def _allocator_text(allocator: dict) -> str:
    """results.json's launch.cpu_allocator (engine/allocator.py) in words."""
    parts = ["huge pages" if allocator.get("huge_pages") else "no huge pages"]
    if allocator.get("retain_freed_memory"):
        parts.append("freed memory kept")
    return ", ".join(parts)


def _results_table(results: dict) -> list[str]:
    def percent(value):
        return f"{value * 100:.2f} %" if isinstance(value, (int, float)) else "—"

    launch = dict(results.get("launch") or {})
    allocator = launch.pop("cpu_allocator", None)
    rows = [
        ("method", results.get("method")), ("dataset", results.get("dataset")),
        ("labels", f"{results.get('labels')} ({results.get('labels_per_class')} per class)"),
        ("test accuracy", percent(results.get("test_accuracy"))), ("best test accuracy", percent(results.get("best_test_accuracy"))),
        ("test loss", f"{results['test_loss']:.4f}" if "test_loss" in results else "—"),
        ("evaluated weights", results.get("evaluated_weights")), ("steps", results.get("steps")),
        ("processes", results.get("world_size")),
        ("launch", ", ".join(f"{k} {v}" for k, v in launch.items() if v is not None) or "—"),
        *([("CPU allocator", _allocator_text(allocator))] if allocator and launch.get("device") == "cpu" else []),
        ("wall seconds", f"{results['wall_seconds']:.0f}" if "wall_seconds" in results else "—"),
        ("train samples/s", f"{results['train_samples_per_second']:.0f}" if results.get("train_samples_per_second") else "—"),
    ]
    if "finetuned" in results:
        rows.append(("after fine-tuning", percent(results["finetuned"].get("test_accuracy"))))
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def write_report(run_dir: str | Path, out: str | Path | None = None, shards: str | None = None) -> Path:
    from dist_ssl.engine import checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    newest = checkpoint.latest(run_dir / "checkpoints")
    if newest is None:
        raise UserError(f"{run_dir} holds no committed checkpoint: not a dist-ssl run folder, or nothing committed yet")
    out = Path(out) if out else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    scalars = read_scalars(run_dir)
    if "eval/accuracy" not in scalars:  # no event files: the checkpoint keeps every evaluation
        history = _history(newest)
        scalars["eval/accuracy"] = [(h["step"], h["accuracy"]) for h in history]
        scalars["eval/loss"] = [(h["step"], h["loss"]) for h in history]
    results_file = run_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    lines = [f"# {results.get('method', run_dir.name)} on {results.get('dataset', '?')}: {run_dir}", ""]
    if results:
        lines += _results_table(results)
    else:
        lines.append(f"(no results.json: the run has not finished; newest checkpoint {newest.name})")
    for name, title, tags, ylabel in CURVES:
        series = [(label, scalars[tag]) for tag, label in tags if scalars.get(tag)]
        if not series:
            continue
        _plot(out / name, title, series, ylabel)
        lines += ["", f"## {title[0].upper()}{title[1:]}", "", f"![{title}]({name})"]
    grid, caption = prediction_grid(run_dir, shards, out)
    lines += ["", "## Test predictions", ""]
    lines += [f"![test predictions]({grid.name})", "", caption] if grid is not None else [caption]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
