"""`dist-ssl pipeline CONFIG`: the billion-scale teacher -> student recipe (Yalniz et al. 2019,
seed 004), and iterative self-training rounds (seeds 000, 001), as one resumable run.

    output_dir/
      pipeline.yaml            the resolved pipeline config (a rerun must match it)
      teacher/                 (1) a training run on the labels, any method
      round-1/pseudo-labels/   (2) the teacher's top-P predictions for every pool sample
      round-1/selected/        (3) the selection (per-class top-K...) as a labeled split
      round-1/student/         (4) the student (another, possibly smaller model) trained on it
      round-1/finetune/        (5) the student fine-tuned on the labels (train.init_from)
      round-2/...              with rounds > 1, each round's final model teaches the next
      tb/                      pseudo-label statistics per round, sample grids, test accuracies
      results.json             (6) teacher, student and fine-tuned test accuracies, per round

Every stage is an ordinary job with its own completion mark: a training stage is done when its
`results.json` exists (an interrupted one resumes from its own checkpoints), a pseudo-label or
selection stage when its `manifest.json` is published (an interrupted one resumes by shard). A
rerun skips what is done. All stages run in the same processes, one process or `accelerate
launch` with N; the process group stays up between them. The pipeline holds the run lock of
output_dir for all of them.

SIGTERM/SIGUSR1 (engine/preemption.py): a training stage commits a checkpoint, an inference stage
finishes its current output shard, a signal between stages stops before the next one; each raises
`Preempted` naming the stage (the command line leaves a PREEMPTED marker that says it, exit 75).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from dist_ssl.config import Config, PipelineConfig, SelectConfig, save_config, to_dict
from dist_ssl.errors import UserError
from dist_ssl.files import atomic_write_json


def _stage(cfg: Config, pipeline: PipelineConfig, folder: Path, **data) -> Config:
    """A stage's config: the pipeline owns its folder, the dataset and what it starts from."""
    init_from = data.pop("init_from", "")
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, shards=pipeline.shards, allow_pipe=cfg.data.allow_pipe or pipeline.allow_pipe, **data),
        train=dataclasses.replace(cfg.train, output_dir=str(folder), init_from=str(init_from)),
    )


def _first_difference(saved, current, prefix: str = "") -> str | None:
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in list(current) + [k for k in saved if k not in current]:
            found = _first_difference(saved.get(key), current.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if saved == current else f"{prefix.rstrip('.')} is {saved!r} there, {current!r} here"


def _claim_run(run: Path, cfg: PipelineConfig) -> None:
    """Rank 0: tie the run folder to this pipeline config, or refuse a folder of another one."""
    path = run / "pipeline.yaml"
    if path.is_file():
        difference = _first_difference(yaml.safe_load(path.read_text()), to_dict(cfg))
        if difference:
            raise UserError(f"{run} holds a pipeline of another config ({difference}): use another output_dir, or the same config to resume it")
    else:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, path)


def with_round(cfg: SelectConfig, round_: int) -> SelectConfig:
    """Round r keeps r x sample_rate of each class: seed 001's growing sample rate."""
    if cfg.policy != "sample_rate":
        return cfg
    return dataclasses.replace(cfg, sample_rate=min(1.0, cfg.sample_rate * round_))


class _Board:
    """The pipeline's own TensorBoard (rank 0): statistics per round, grids, test accuracies."""

    def __init__(self, run: Path, main: bool):
        self.writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run / "tb"))

    def accuracy(self, stage: str, results: dict, round_: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(f"test_accuracy/{stage}", results["test_accuracy"], round_)

    def round(self, round_: int, predictions: dict, selected: dict, selected_dir: Path) -> None:
        if self.writer is None:
            return
        from dist_ssl.inference.label_stats import log_statistics, sample_grid

        log_statistics(self.writer, "pseudo_labels/pool", predictions["statistics"], round_)
        log_statistics(self.writer, "pseudo_labels/selected", selected["pseudo_labels"]["statistics"], round_)
        grid = sample_grid(selected_dir, selected["class_names"])
        if grid is not None:
            self.writer.add_image("pseudo_labels/selected_samples", grid, round_, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _train_stage(name: str, cfg: Config) -> dict:
    from dist_ssl.engine.loop import train

    done = Path(cfg.train.output_dir) / "results.json"
    if done.is_file():
        results = json.loads(done.read_text())
        _say(f"== {name}: done before (test accuracy {results['test_accuracy']:.4f})")
        return results
    _say(f"== {name}: {cfg.method.name} / {cfg.model.name} -> {cfg.train.output_dir}")
    return train(cfg)


def _say(text: str) -> None:
    from dist_ssl.engine.accelerator import process_state

    if process_state().is_main_process:
        print(text, flush=True)


def _in_stage(name: str, work):
    """Run one stage. A signal caught before it (by any rank) stops the pipeline here; one caught
    inside stops the stage as it would stop alone. Either way the `Preempted` names the stage."""
    from dist_ssl.engine import preemption

    stop = preemption.stop_requested()
    if stop:
        raise preemption.Preempted(stop, "before it started", stage=name)
    try:
        return work()
    except preemption.Preempted as stopped:
        stopped.stage = name
        raise


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run (or resume) every stage of the pipeline; returns results.json's content. Holds the run
    lock of output_dir. Call it on every rank."""
    from dist_ssl.engine.lock import run_lock

    with run_lock(cfg.output_dir):
        return _run_pipeline(cfg)


def _run_pipeline(cfg: PipelineConfig) -> dict:
    from dist_ssl.engine.accelerator import on_main, process_state

    if not cfg.shards:
        raise UserError("config key 'shards' is not set: point it at a folder written by `dist-ssl shards write`")
    if not Path(cfg.shards).is_dir():
        raise UserError(f"shard folder not found: {cfg.shards}")
    run = Path(cfg.output_dir)
    state = process_state()
    on_main(state, lambda: _claim_run(run, cfg))
    final = run / "results.json"
    if final.is_file():
        results = json.loads(final.read_text())
        _say(f"pipeline {run} is complete: nothing to do")
        _table(results)
        return results

    board = _Board(run, state.is_main_process)
    try:
        results = _stages(cfg, run, board)
    finally:  # a preempted stage too: what the board has is flushed
        board.close()
    on_main(state, lambda: atomic_write_json(final, results))
    _table(results)
    return results


def _stages(cfg: PipelineConfig, run: Path, board: _Board) -> dict:
    from dist_ssl.engine.loop import split_path
    from dist_ssl.inference.pseudo_label import pseudo_label
    from dist_ssl.inference.select import select

    teacher_cfg = _stage(cfg.teacher, cfg, run / "teacher")
    pool = split_path(teacher_cfg, "unlabeled")
    labeled = split_path(teacher_cfg, "labeled")
    teacher = _in_stage("teacher", lambda: _train_stage("teacher", teacher_cfg))
    board.accuracy("teacher", teacher, 0)
    results = {"output_dir": str(run), "teacher": _summary(teacher), "rounds": []}
    teacher_run = run / "teacher"
    for round_ in range(1, cfg.rounds + 1):
        folder = run / f"round-{round_}"
        _say(f"== round {round_}/{cfg.rounds}: pseudo-label {pool} with {teacher_run}")
        inference = dataclasses.replace(cfg.pseudo_label, allow_pipe=cfg.pseudo_label.allow_pipe or cfg.allow_pipe)
        predictions = _in_stage(f"round {round_} pseudo-labels",
                                lambda: pseudo_label(teacher_run, pool, folder / "pseudo-labels", inference))
        selection = with_round(cfg.select, round_)
        _say(f"== round {round_}: select ({selection.policy})")
        selected = _in_stage(f"round {round_} select", lambda: select(
            folder / "pseudo-labels", folder / "selected", selection, labeled if selection.include_labeled else None,
            allow_pipe=cfg.allow_pipe or cfg.pseudo_label.allow_pipe))
        board.round(round_, predictions, selected, folder / "selected")
        student_cfg = _stage(cfg.student, cfg, folder / "student", labeled=str((folder / "selected").resolve()))
        student = _in_stage(f"round {round_} student", lambda: _train_stage(f"round {round_} student", student_cfg))
        board.accuracy("student", student, round_)
        entry = {"round": round_, "pseudo_labels": _label_summary(predictions["statistics"]),
                 "selected": dict(_label_summary(selected["pseudo_labels"]["statistics"]), num_samples=selected["num_samples"]),
                 "student": _summary(student)}
        teacher_run = folder / "student"
        if cfg.finetune_on_labels:
            finetune_cfg = _stage(cfg.finetune, cfg, folder / "finetune", init_from=folder / "student")
            finetune = _in_stage(f"round {round_} fine-tune", lambda: _train_stage(f"round {round_} fine-tune", finetune_cfg))
            board.accuracy("finetune", finetune, round_)
            entry["finetune"] = _summary(finetune)
            teacher_run = folder / "finetune"
        results["rounds"].append(entry)
    last = results["rounds"][-1]
    results["final"] = last.get("finetune", last["student"])
    return results


def _summary(results: dict) -> dict:
    keys = ("test_accuracy", "best_test_accuracy", "test_loss", "labels", "steps", "wall_seconds", "run_dir")
    return {key: results.get(key) for key in keys}


def _label_summary(stats: dict) -> dict:
    return {key: stats[key] for key in ("count", "mean_confidence", "accuracy")}


def _table(results: dict) -> None:
    def pct(value):
        return "-" if value is None else f"{value * 100:.2f}%"

    lines = [f"{'stage':<22}{'test acc':>10}{'pseudo-label acc':>18}{'samples':>9}"]
    lines.append(f"{'teacher':<22}{pct(results['teacher']['test_accuracy']):>10}")
    for entry in results["rounds"]:
        r = entry["round"]
        lines.append(f"{f'round {r} pool':<22}{'':>10}{pct(entry['pseudo_labels']['accuracy']):>18}{entry['pseudo_labels']['count']:>9}")
        lines.append(f"{f'round {r} selected':<22}{'':>10}{pct(entry['selected']['accuracy']):>18}{entry['selected']['num_samples']:>9}")
        lines.append(f"{f'round {r} student':<22}{pct(entry['student']['test_accuracy']):>10}")
        if "finetune" in entry:
            lines.append(f"{f'round {r} fine-tuned':<22}{pct(entry['finetune']['test_accuracy']):>10}")
    _say("\n".join(lines))

