"""What a run tells: its TensorBoard files read back with tensorboard's own reader, and the progress
lines that stand in for the bar where stderr is no terminal (logs of nohup, SLURM, docker)."""

import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from dist_ssl.data.shards.manifest import load_manifest
from dist_ssl.engine.evaluate import evaluate_checkpoint
from dist_ssl.engine.loop import train
from tests.conftest import REPO, accelerate_command, tiny_config

# A lower threshold than the digits config's 0.95: after a few steps some pseudo-labels pass, some not.
FIXMATCH = ("method.fixmatch.threshold=0.2",)
UNLABELED_PER_STEP = 40  # tiny_config: batch 20, unlabeled ratio 2
TRAIN_LINE = re.compile(r"step (\d+)/8 \((\d+)%\) \| loss [\d.]+ loss_labeled [\d.]+ loss_unlabeled [\d.]+ "
                        r"\| (\d+) images/s \| data wait (\d+)% \| ETA \d+:\d\d:\d\d")


def read_events(tb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events, tag) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.fixture(scope="module")
def fixmatch_run(digits_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("story") / "run"
    results = train(tiny_config(digits_shards, run, "fixmatch", *FIXMATCH))
    return run, results, read_events(run / "tb")


def test_speed_scalars_at_every_flush(fixmatch_run):
    _, _, events = fixmatch_run
    speed, wait = scalars(events, "train/images_per_second"), scalars(events, "train/data_wait_fraction")
    assert sorted(speed) == sorted(wait) == [2, 4, 6, 8]
    assert all(v > 0 for v in speed.values()) and all(0 <= v <= 1 for v in wait.values())


def test_pseudo_label_class_counts_add_up_to_the_used_pseudo_labels(fixmatch_run):
    _, _, events = fixmatch_run
    mask_rate = scalars(events, "train/mask_rate")
    per_class = [scalars(events, f"pseudo_labels/class_{k}") for k in range(10)]
    histograms = {e.step: e.histogram_value for e in events.Histograms("pseudo_labels/classes")}
    assert sorted(histograms) == sorted(mask_rate) == [2, 4, 6, 8]
    used_somewhere = False
    for step, rate in mask_rate.items():
        counts = [c[step] for c in per_class]
        assert all(c == int(c) for c in counts)
        # a window is 2 steps of 40 unlabeled samples; the mask rate is its share that reached the loss
        assert sum(counts) == pytest.approx(rate * 2 * UNLABELED_PER_STEP, abs=1e-3)
        assert list(histograms[step].bucket) == counts and histograms[step].num == sum(counts)
        used_somewhere |= 0 < sum(counts) < 2 * UNLABELED_PER_STEP
    assert used_somewhere, "every window used all or none of its pseudo-labels: the check above proves little"


def decoded(image_event) -> Image.Image:
    image = Image.open(io.BytesIO(image_event.encoded_image_string))
    image.load()
    assert image.format == "PNG" and image.size == (image_event.width, image_event.height)
    assert len(np.unique(np.asarray(image.convert("L")))) > 10  # drawn, not blank
    return image


def test_each_evaluation_draws_the_confusion_matrix_and_the_unlabeled_grid(fixmatch_run, digits_shards):
    run, results, events = fixmatch_run
    assert {"eval/confusion_matrix", "eval/unlabeled_pseudo_labels"} <= set(events.Tags()["images"])
    confusion = events.Images("eval/confusion_matrix")
    grid = events.Images("eval/unlabeled_pseudo_labels")
    assert [e.step for e in confusion] == [e.step for e in grid] == [4, 8]
    for event in confusion:
        assert decoded(event).size[0] == decoded(event).size[1] >= 400  # square: one cell per (true, predicted)
    for event in grid:
        width, height = decoded(event).size
        assert width >= 500 and height >= 500  # 5 x 5 samples, each with its caption
    # the counts drawn: every test sample once, rows by true class, the diagonal the accuracy reported
    evaluated = evaluate_checkpoint(str(run), str(digits_shards))
    counts = np.asarray(evaluated["confusion"])
    test = load_manifest(digits_shards / "test")
    assert counts.shape == (10, 10) and counts.sum() == test.num_samples == evaluated["samples"]
    assert counts.sum(axis=1).tolist() == test.data["class_histogram"]
    assert np.trace(counts) / counts.sum() == evaluated["accuracy"] == results["test_accuracy"]


def test_hparams_hold_the_settings_and_the_final_test_accuracy(fixmatch_run):
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run, results, events = fixmatch_run
    assert scalars(events, "hparam/test_accuracy") == {8: pytest.approx(results["test_accuracy"], rel=1e-6)}
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    assert {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG} <= set(content)
    experiment = HParamsPluginData.FromString(content[metadata.EXPERIMENT_TAG]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["hparam/test_accuracy"]
    hparams = HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG]).session_start_info.hparams
    assert hparams["method.name"].string_value == "fixmatch"
    assert hparams["method.fixmatch.threshold"].number_value == 0.2 and hparams["optim.lr"].number_value == 0.03
    assert hparams["data.batch_size"].number_value == 20 and hparams["train.total_steps"].number_value == 8
    assert hparams["train.output_dir"].string_value == str(run)
    assert not any(name.startswith("method.mpl.") for name in hparams)  # only the run's own method's section
    assert hparams["method.concat_forward"].number_value == 1  # and the keys every method shares (a bool as 1)


def test_a_resumed_run_logs_the_same_class_counts(digits_shards, tmp_path):
    """A checkpoint at step 3 falls inside the window of steps 3-4: its counts travel in the checkpoint.
    Threshold 0: every pseudo-label is used, so the window of steps 3-4 counts 2 x 40 of them."""
    every = ("method.fixmatch.threshold=0", "train.checkpoint_every_steps=3", "train.keep_last=5")
    train(tiny_config(digits_shards, tmp_path / "full", "fixmatch", *every))
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-3", tmp_path / "resumed" / "checkpoints" / "step-3")
    train(tiny_config(digits_shards, tmp_path / "resumed", "fixmatch", *every))
    full, resumed = read_events(tmp_path / "full" / "tb"), read_events(tmp_path / "resumed" / "tb")
    for k in range(10):
        ours = scalars(resumed, f"pseudo_labels/class_{k}")
        assert sorted(ours) == [4, 6, 8]
        assert ours == {step: value for step, value in scalars(full, f"pseudo_labels/class_{k}").items() if step >= 4}
    assert sum(scalars(resumed, f"pseudo_labels/class_{k}")[4] for k in range(10)) == 2 * UNLABELED_PER_STEP


@pytest.mark.slow
def test_two_processes_count_each_pseudo_label_and_test_sample_once(digits_shards, tmp_path):
    """Threshold 0: each of the 2 ranks uses its 20 pseudo-labels per step, 2 x 40 per window over
    both; the confusion counts of a 2-process evaluation cover the test split once. Without a
    terminal, the run prints one progress line per flush."""
    run = tmp_path / "run"
    args = ["train", "configs/digits/fixmatch.yaml", f"data.shards={digits_shards}", f"train.output_dir={run}", "data.batch_size=20",
            "data.unlabeled_batch_ratio=2", "train.epochs=2", "train.steps_per_epoch=4", "train.log_every_steps=2",
            "method.fixmatch.threshold=0"]
    trained, done = (subprocess.run(accelerate_command(2, *command), cwd=REPO, capture_output=True, text=True, timeout=300)
                     for command in (args, ["evaluate", str(run), "--shards", str(digits_shards), "--json"]))
    for finished in (trained, done):
        assert finished.returncode == 0, finished.stderr[-3000:]
    assert_progress_lines(trained.stderr)  # stderr is a pipe here, as in nohup, SLURM or docker logs
    events = read_events(run / "tb")
    for step in (2, 4, 6, 8):
        assert sum(scalars(events, f"pseudo_labels/class_{k}")[step] for k in range(10)) == 2 * UNLABELED_PER_STEP
    assert [e.step for e in events.Images("eval/confusion_matrix")] == [4, 8]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2
    assert scalars(events, "hparam/test_accuracy") == {8: pytest.approx(results["test_accuracy"], rel=1e-6)}
    evaluated = json.loads(done.stdout.strip().splitlines()[-1])
    counts = np.asarray(evaluated["confusion"])
    assert counts.sum() == evaluated["samples"] == load_manifest(digits_shards / "test").num_samples
    assert np.trace(counts) / counts.sum() == evaluated["accuracy"] == results["test_accuracy"]


def assert_progress_lines(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("step ")]
    steps = [int(TRAIN_LINE.fullmatch(line).group(1)) for line in lines]
    assert steps == [2, 4, 6, 8], stderr
    assert all(int(TRAIN_LINE.fullmatch(line).group(2)) == step * 100 // 8 for line, step in zip(lines, steps))
    assert lines[-1].endswith("ETA 0:00:00")


def test_a_window_longer_than_the_interval_gets_lines_in_between(digits_shards, tmp_path, monkeypatch, capsys):
    """Interval 0: a line after every step; between flushes, from the window so far."""
    monkeypatch.setenv("DIST_SSL_PROGRESS_SECONDS", "0")
    train(tiny_config(digits_shards, tmp_path / "run", "fixmatch", "train.log_every_steps=4"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [int(TRAIN_LINE.fullmatch(line).group(1)) for line in lines] == list(range(1, 9))
