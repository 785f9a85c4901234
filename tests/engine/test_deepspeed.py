"""DeepSpeed ZeRO-2 for real: `accelerate launch` with launch/accelerate/deepspeed_zero2.yaml on CPU
(DeepSpeed's CPU accelerator, ranks joined by gloo), compared with the plain and DDP runs of the same
config on the same data."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_ssl.engine.loop import train
from tests.conftest import REPO, TINY, accelerate_command, assert_same_checkpoint, free_port, tiny_config

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install -e '.[deepspeed]')")
pytest.importorskip("transformers", reason="accelerate's DeepSpeed plugin needs transformers")

ZERO2 = REPO / "launch" / "accelerate" / "deepspeed_zero2.yaml"


def deepspeed_command(processes: int, *args: str, entry: tuple[str, ...] = ("-m", "dist_ssl")) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO2), "--num_processes", str(processes),
        "--main_process_port", str(free_port()), *entry, *args,
    ]


def launch(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def train_args(shards: Path, out: Path, method: str, *overrides: str) -> list[str]:
    cfg = tiny_config(shards, out, method, "train.log_every_steps=1", *overrides)  # the same run as tiny_config's
    return ["train", str(REPO / "configs" / "digits" / f"{method}.yaml"), f"data.shards={shards}", f"train.output_dir={out}",
            f"data.batch_size={cfg.data.batch_size}", f"data.unlabeled_batch_ratio={cfg.data.unlabeled_batch_ratio}",
            f"train.epochs={cfg.train.epochs}", f"train.steps_per_epoch={cfg.train.steps_per_epoch}", "train.log_every_steps=1", *overrides]


def losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [event.value for event in events.Scalars("train/loss")]


@pytest.mark.slow
def test_zero2_on_one_process_trains_as_the_plain_run(digits_shards, tmp_path):
    """supervised, pseudo_label and fixmatch in one launch (tests/train_each.py), each against its
    plain run. They clip: DeepSpeed clips inside its engine, from optim.grad_clip, not accelerate's 1.0."""
    methods = ("supervised", "pseudo_label", "fixmatch")
    extra = ("train.log_every_steps=1", "optim.grad_clip=0.5")
    configs = [str(REPO / "configs" / "digits" / f"{method}.yaml") for method in methods]
    launch(deepspeed_command(1, str(tmp_path / "zero2"), *configs, "--", f"data.shards={digits_shards}", *TINY, *extra,
                             entry=(str(REPO / "tests" / "train_each.py"),)))
    for method in methods:
        plain = train(tiny_config(digits_shards, tmp_path / "plain" / method, method, *extra))
        results = json.loads((tmp_path / "zero2" / method / "results.json").read_text())
        launch_facts = {k: v for k, v in results["launch"].items() if k != "cpu_allocator"}
        assert launch_facts == {"distributed_type": "DEEPSPEED", "backend": "gloo", "device": "cpu", "mixed_precision": "no", "zero_stage": 2}
        assert plain["launch"]["distributed_type"] == "NO" and plain["launch"]["zero_stage"] is None
        ours, theirs = losses(tmp_path / "zero2" / method), losses(tmp_path / "plain" / method)
        assert len(ours) == len(theirs) == 8, method
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6), method
        assert results["test_accuracy"] == pytest.approx(plain["test_accuracy"], abs=1e-9), method


@pytest.mark.slow
def test_zero2_on_two_processes_is_ddp_and_its_checkpoints_resume(digits_shards, tmp_path):
    """Two gloo ranks: ZeRO-2 splits the optimizer state over them, DDP keeps it whole. The losses
    match, and a ZeRO-2 run resumed from its middle checkpoint ends with what DDP ends with, to the
    bit: checkpoints hold the optimizer state whole, whichever of the two wrote it."""
    args = ("model.dropout=0.3", "data.workers=1", "train.keep_last=10")
    launch(accelerate_command(2, *train_args(digits_shards, tmp_path / "ddp", "fixmatch", *args)))
    launch(deepspeed_command(2, *train_args(digits_shards, tmp_path / "zero2", "fixmatch", *args)))
    assert losses(tmp_path / "zero2") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5, abs=1e-6)

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "zero2" / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    done = launch(deepspeed_command(2, *train_args(digits_shards, resumed, "fixmatch", *args)))
    assert f"resumed from {resumed / 'checkpoints' / 'step-4'} at step 4" in done.stdout
    assert_same_checkpoint(tmp_path / "ddp" / "checkpoints" / "step-8", resumed / "checkpoints" / "step-8")


@pytest.mark.slow
@pytest.mark.parametrize("launch_args, method, message", [
    ((), "mpl", "method 'mpl' steps 2 optimizers (teacher, student); DeepSpeed runs one"),
    (("--zero_stage", "3"), "fixmatch", "ZeRO stage 3 is not supported, only stage 2"),
])
def test_what_deepspeed_cannot_run_is_one_clear_error(digits_shards, tmp_path, launch_args, method, message):
    command = deepspeed_command(1, *train_args(digits_shards, tmp_path / "run", method, "roles.student.wait_steps=0"))
    at = command.index("-m", 3)
    done = subprocess.run(command[:at] + list(launch_args) + command[at:], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("dist-ssl: error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-3000:]
    assert not (tmp_path / "run" / "results.json").exists()
