"""`dist-ssl report`: PNGs that decode, read back from a real run's TensorBoard files and checkpoint,
and a report.md that embeds each of them next to the results table."""

import re
import shutil

import numpy as np
from PIL import Image

from dist_ssl.engine.loop import train
from tests.conftest import run_cli, tiny_config


def embedded(report) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())


def assert_decodes(path, min_size=(300, 200)):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes every pixel, not just the header
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # drawn, not blank


def test_report_of_a_fixmatch_run_draws_every_curve_and_the_predictions(digits_shards, tmp_path):
    run = tmp_path / "fixmatch"
    results = train(tiny_config(digits_shards, run, "fixmatch", "train.log_every_steps=1"))
    done = run_cli("report", str(run))
    assert done.returncode == 0, done.stderr
    report = run / "report" / "report.md"
    assert done.stdout.strip() == f"wrote {report}"
    assert embedded(report) == ["losses.png", "test.png", "pseudo_labels.png", "predictions.png"]
    for name in embedded(report):
        assert_decodes(report.parent / name)
    text = report.read_text()
    assert f"| test accuracy | {results['test_accuracy'] * 100:.2f} % |" in text
    assert "| launch | distributed_type NO, device cpu, mixed_precision no |" in text
    huge_pages = results["launch"]["cpu_allocator"]["huge_pages"]  # in-process: as pytest was started
    assert f"| CPU allocator | {'huge pages' if huge_pages else 'no huge pages'} |" in text
    right = int(re.search(r"(\d) of 9 right", text).group(1))
    assert 0 <= right <= 9


def test_report_without_event_files_takes_the_evaluations_from_the_checkpoint(digits_shards, tmp_path):
    """A supervised run has no pseudo-labels to plot; without tb/ the test curve still comes from
    the newest checkpoint's evaluation history. --out puts the report elsewhere."""
    run = tmp_path / "supervised"
    train(tiny_config(digits_shards, run, "supervised"))
    shutil.rmtree(run / "tb")
    done = run_cli("report", str(run), "--out", str(tmp_path / "elsewhere"), "--shards", str(digits_shards))
    assert done.returncode == 0, done.stderr
    report = tmp_path / "elsewhere" / "report.md"
    assert embedded(report) == ["test.png", "predictions.png"]
    for name in embedded(report):
        assert_decodes(report.parent / name)


def test_report_of_a_folder_without_checkpoints_is_one_clear_error(tmp_path):
    done = run_cli("report", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == f"dist-ssl: error: {tmp_path} holds no committed checkpoint: not a dist-ssl run folder, or nothing committed yet"
