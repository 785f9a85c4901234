"""What a run tells: the progress lines that stand in for the bar where stderr is no terminal
(logs of nohup, SLURM, docker)."""

import re

from dist_ssl.engine.loop import train
from tests.conftest import run_cli, tiny_config

TRAIN_LINE = re.compile(r"step (\d+)/8 \((\d+)%\) \| loss [\d.]+ loss_labeled [\d.]+ loss_unlabeled [\d.]+ "
                        r"\| (\d+) images/s \| data wait (\d+)% \| ETA \d+:\d\d:\d\d")


def test_without_a_terminal_training_prints_a_progress_line_per_flush(digits_shards, tmp_path):
    done = run_cli("train", "configs/digits/fixmatch.yaml", f"data.shards={digits_shards}", f"train.output_dir={tmp_path / 'run'}",
                   "data.batch_size=20", "data.unlabeled_batch_ratio=2", "train.epochs=2", "train.steps_per_epoch=4",
                   "train.log_every_steps=2", "data.workers=0")  # stderr is a pipe here
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("step ")]
    steps = [int(TRAIN_LINE.fullmatch(line).group(1)) for line in lines]
    assert steps == [2, 4, 6, 8], done.stderr
    assert all(int(TRAIN_LINE.fullmatch(line).group(2)) == step * 100 // 8 for line, step in zip(lines, steps))
    assert lines[-1].endswith("ETA 0:00:00")
    print(lines[-1])


def test_a_window_longer_than_the_interval_gets_lines_in_between(digits_shards, tmp_path, monkeypatch, capsys):
    """Interval 0: a line after every step; between flushes, from the window so far."""
    monkeypatch.setenv("DIST_SSL_PROGRESS_SECONDS", "0")
    train(tiny_config(digits_shards, tmp_path / "run", "fixmatch", "train.log_every_steps=4"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [int(TRAIN_LINE.fullmatch(line).group(1)) for line in lines] == list(range(1, 9))
