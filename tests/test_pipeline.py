"""`dist-ssl pipeline`: teacher -> pseudo-labels -> top-K -> student -> fine-tune, one process and
two, skipping finished stages and resuming interrupted ones; self-training rounds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from dist_ssl.cli import PREEMPTED
from dist_ssl.config import load_pipeline_config, save_config
from dist_ssl.engine import checkpoint
from dist_ssl.inference.pseudo_label import load_predictions_manifest
from dist_ssl.pipeline import run_pipeline
from tests.conftest import REPO, accelerate_command, run_cli
from tests.conftest import kill_tree

CONFIG = REPO / "configs" / "pipelines" / "digits_billion_scale.yaml"
TINY = ["teacher.train.epochs=1", "teacher.train.steps_per_epoch=10", "student.train.epochs=2", "student.train.steps_per_epoch=5",
        "finetune.train.epochs=1", "finetune.train.steps_per_epoch=5", "select.top_k=20", "select.maxcount=50"]


def tiny(shards, out, *overrides):
    return load_pipeline_config(CONFIG, [f"shards={shards}", f"output_dir={out}", *TINY, *overrides])


def tensorboard(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return events.Tags()


def test_one_process_runs_every_stage_then_skips_them(digits_shards, tmp_path):
    run = tmp_path / "run"
    results = run_pipeline(tiny(digits_shards, run))
    assert json.loads((run / "results.json").read_text()) == results
    assert yaml.safe_load((run / "pipeline.yaml").read_text())["select"]["top_k"] == 20
    round_ = results["rounds"][0]
    assert round_["selected"]["num_samples"] == 200 and round_["pseudo_labels"]["count"] == 1207
    for stage in ("student", "finetune"):
        assert 0 <= round_[stage]["test_accuracy"] <= 1
    assert results["final"] == round_["finetune"]
    # the student learned from the selection; the fine-tune started from the student, on the labels
    student_cfg = yaml.safe_load((run / "round-1" / "student" / "config.yaml").read_text())
    assert student_cfg["data"]["labeled"] == str((run / "round-1" / "selected").resolve())
    finetune_cfg = yaml.safe_load((run / "round-1" / "finetune" / "config.yaml").read_text())
    assert finetune_cfg["train"]["init_from"] == str(run / "round-1" / "student") and finetune_cfg["data"]["labeled"] == "labeled"
    assert load_predictions_manifest(run / "round-1" / "pseudo-labels")["checkpoint"].startswith(str((run / "teacher").resolve()))
    tags = tensorboard(run / "tb")
    assert {"test_accuracy/teacher", "test_accuracy/student", "test_accuracy/finetune", "pseudo_labels/pool/accuracy",
            "pseudo_labels/selected/accuracy", "pseudo_labels/selected/mean_confidence"} <= set(tags["scalars"])
    assert {"pseudo_labels/pool/confidence", "pseudo_labels/selected/classes"} <= set(tags["histograms"])
    assert tags["images"] == ["pseudo_labels/selected_samples"]

    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert run_pipeline(tiny(digits_shards, run)) == results
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == stamps  # nothing redone


def test_self_training_rounds_grow_the_pseudo_labeled_set(digits_shards, tmp_path):
    run = tmp_path / "rounds"
    cfg = tiny(digits_shards, run, "rounds=2", "finetune_on_labels=false", "select.policy=sample_rate", "select.sample_rate=0.3",
               "select.include_labeled=true", "student.train.epochs=1")
    results = run_pipeline(cfg)
    first, second = results["rounds"]
    assert "finetune" not in first and results["final"] == second["student"]
    assert first["selected"]["count"] < second["selected"]["count"]  # 30 %, then 60 % of each predicted class
    assert first["selected"]["num_samples"] == first["selected"]["count"] + 50  # + the labels
    # round 2's teacher is round 1's student
    assert load_predictions_manifest(run / "round-2" / "pseudo-labels")["checkpoint"].startswith(str((run / "round-1" / "student").resolve()))


def test_config_errors_are_one_line(digits_shards, tmp_path):
    result = run_cli("pipeline", str(CONFIG), f"shards={digits_shards}", "student.train.epoch=3")
    assert result.returncode == 2 and result.stderr.strip() == (
        "dist-ssl: error: unknown config key 'student.train.epoch' (did you mean 'student.train.epochs'?)")
    result = run_cli("pipeline", str(CONFIG), f"shards={digits_shards}", "finetune.data.batch_size=0")
    assert result.returncode == 2 and result.stderr.strip() == "dist-ssl: error: config key 'finetune.data.batch_size' must be positive"
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_pipeline_config(CONFIG, [f"shards={digits_shards}", f"output_dir={run}", "rounds=3"]), run / "pipeline.yaml")
    result = run_cli("pipeline", str(CONFIG), f"shards={digits_shards}", f"output_dir={run}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"{run} holds a pipeline of another config (rounds is 3 there, 1 here)" in result.stderr


@pytest.mark.slow
def test_two_processes_killed_after_selection_resume_where_they_stopped(digits_shards, tmp_path):
    run = tmp_path / "run"
    args = ["pipeline", str(CONFIG), f"shards={digits_shards}", f"output_dir={run}", *TINY, "student.train.epochs=4"]
    victim = subprocess.Popen(accelerate_command(2, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    deadline = time.time() + 600
    while not (run / "round-1" / "selected" / "manifest.json").exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(victim.pid)
    log, _ = victim.communicate()
    assert (run / "round-1" / "selected" / "manifest.json").exists(), log
    assert not (run / "results.json").exists()

    resumed = subprocess.run(accelerate_command(2, *args), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    out = resumed.stdout
    assert "== teacher: done before" in out
    assert "round-1/pseudo-labels are complete (1207 samples): nothing to do" in out
    assert "round-1/selected is complete (200 samples): nothing to do" in out
    results = json.loads((run / "results.json").read_text())
    assert results["rounds"][0]["finetune"]["test_accuracy"] is not None
    for stage in ("teacher", "round-1/student", "round-1/finetune"):
        assert json.loads((run / stage / "results.json").read_text())["world_size"] == 2


def committed_step(run) -> int:
    found = checkpoint.committed(run / "checkpoints")
    return found[-1][0] if found else 0


@pytest.mark.slow
def test_a_sigterm_in_a_stage_exits_75_naming_it_and_the_rerun_goes_on_from_there(digits_shards, tmp_path):
    """SIGTERM while the teacher trains, then while the student trains: each time the stage commits,
    the command exits 75 and PREEMPTED names the stage; the rerun skips what was done."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "dist_ssl", "pipeline", str(CONFIG), f"shards={digits_shards}", f"output_dir={run}", *TINY,
            "teacher.train.checkpoint_every_steps=2", "student.train.checkpoint_every_steps=2", "teacher.train.epochs=3"]

    def stop_when(ready, stage):
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 75, out + err
        marker = json.loads((run / PREEMPTED).read_text())
        assert marker["stage"] == stage and marker["signal"] == "SIGTERM" and marker["exit_code"] == 75, marker
        assert f"dist-ssl: in stage {stage}: stopped by SIGTERM at step {marker['resumable_at_step']} after committing" in err
        return out

    stop_when(lambda: committed_step(run / "teacher") >= 2, "teacher")
    out = stop_when(lambda: committed_step(run / "round-1" / "student") >= 2, "round 1 student")
    assert "resumed from" in out and "round-1/pseudo-labels" in out
    last = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stdout + last.stderr
    assert "== teacher: done before" in last.stdout and "round-1/selected is complete" in last.stdout
    assert f"resumed from {run / 'round-1' / 'student' / 'checkpoints'}" in last.stdout
    assert (run / "results.json").is_file() and not (run / PREEMPTED).exists()
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or p.name == "dist-ssl.lock"]
