"""The engine with methods of several networks and optimizers (MPL: teacher + student; SMPL: two
optimizers over one network): resume of every role, wait steps, EMA of the evaluated network only,
init_from and the fine-tune stage."""

import json
import shutil

import pytest
import torch
from accelerate.utils import DistributedType

from dist_ssl.config import role_model
from dist_ssl.engine import checkpoint
from dist_ssl.engine.loop import check_deepspeed, train
from dist_ssl.errors import UserError
from dist_ssl.methods import METHODS
from dist_ssl.models import build_model
from tests.conftest import tiny_config
from tests.engine.test_loop import assert_same_weights, weights

MPL = ("roles.student.wait_steps=2", "train.keep_last=5", "method.mpl.baseline_decay=0.9", "method.mpl.uda_steps=3")


def saved(run, step, name="training.pt"):
    return checkpoint.load_file(run / "checkpoints" / f"step-{step}" / name)


@pytest.mark.parametrize("method, extra", [("mpl", MPL), ("smpl", ("train.keep_last=5",))])
def test_resume_restores_every_network_optimizer_and_the_feedback_baseline(digits_shards, tmp_path, method, extra):
    """kekmodel's MPL never reloads its student on resume; here a run resumed from its middle
    checkpoint ends bit-identical to the uninterrupted one (teacher, student, EMA)."""
    full = train(tiny_config(digits_shards, tmp_path / "full", method, *extra))
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-4", resumed_dir / "step-4")
    resumed = train(tiny_config(digits_shards, tmp_path / "resumed", method, *extra))
    assert resumed["steps"] == full["steps"] == 8
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert sorted(a["nets"]) == sorted(METHODS[method].roles)
    assert_same_weights(a, b)
    middle = saved(tmp_path / "full", 4)
    assert sorted(middle["optimizers"]) == sorted(METHODS[method].optimizer_specs(tiny_config(digits_shards, tmp_path, method, *extra)))
    own = "rank-00000.pt"  # method state is saved per rank (engine/checkpoint.py)
    assert saved(tmp_path / "full", 4, own)["method"]["baseline"] != 0.0  # the baseline moved, and was saved for the resume
    assert saved(tmp_path / "full", 8, own)["method"] == saved(tmp_path / "resumed", 8, own)["method"]


def test_student_waits_then_starts_its_own_schedule_and_only_it_has_an_ema(digits_shards, tmp_path):
    cfg = tiny_config(digits_shards, tmp_path / "run", "mpl", "roles.student.wait_steps=4", "optim.warmup_steps=2")
    train(cfg)
    torch.manual_seed(cfg.train.seed)  # the loop builds the networks in role order from this seed
    initial = {role: build_model(role_model(cfg, role), 10, (1, 8, 8)).state_dict() for role in METHODS["mpl"].roles}
    at_4 = checkpoint.load_file(tmp_path / "run" / "checkpoints" / "step-4" / "model.pt")
    for name, tensor in initial["student"].items():
        assert torch.equal(at_4["nets"]["student"][name], tensor), name
    assert any(not torch.equal(at_4["nets"]["teacher"][n], t) for n, t in initial["teacher"].items())
    assert sorted(at_4["emas"]) == ["student"]
    schedules = saved(tmp_path / "run", 4)["schedulers"]
    assert schedules["teacher"]["last_epoch"] == 4 and schedules["student"]["last_epoch"] == 0
    at_8 = saved(tmp_path / "run", 8)["schedulers"]
    assert at_8["student"]["last_epoch"] == 4  # the student's schedule counts its own steps
    assert not torch.equal(weights(tmp_path / "run")["nets"]["student"]["fc2.weight"], initial["student"]["fc2.weight"])


def test_a_wait_as_long_as_the_run_is_refused(digits_shards, tmp_path):
    with pytest.raises(UserError, match="optimizer 'student' waits 8 steps, but the run has only 8"):
        train(tiny_config(digits_shards, tmp_path / "run", "mpl", "roles.student.wait_steps=8"))


def test_roles_can_differ_in_model_and_learning_rate(digits_shards, tmp_path):
    train(tiny_config(digits_shards, tmp_path / "run", "mpl", "roles.student.wait_steps=0", "roles.student.model=mlp",
                      "roles.teacher.lr=0.1", "optim.schedule=constant"))
    model = weights(tmp_path / "run")
    assert "net.0.weight" in model["nets"]["student"] and "conv1.weight" in model["nets"]["teacher"]
    groups = saved(tmp_path / "run", 8)["optimizers"]
    assert groups["teacher"]["param_groups"][0]["initial_lr"] == 0.1 and groups["student"]["param_groups"][0]["initial_lr"] == 0.03
    meta = json.loads((checkpoint.latest(tmp_path / "run" / "checkpoints") / "meta.json").read_text())
    assert meta["model"] == "mlp" and meta["eval_role"] == "student"


def test_finetune_stage_starts_from_the_students_ema_without_dropout(digits_shards, tmp_path):
    run = tmp_path / "run"
    results = train(tiny_config(digits_shards, run, "mpl", "roles.student.wait_steps=2", "train.finetune.epochs=1",
                                "train.finetune.steps_per_epoch=3", "train.finetune.batch_size=10", "train.finetune.lr=1e-9",
                                "train.finetune.momentum=0"))
    tuned = json.loads((run / "finetune" / "results.json").read_text())
    assert results["finetuned"]["test_accuracy"] == tuned["test_accuracy"] and tuned["method"] == "supervised" and tuned["steps"] == 3
    assert json.loads((run / "results.json").read_text())["finetuned"] == results["finetuned"]
    import yaml

    ft_cfg = yaml.safe_load((run / "finetune" / "config.yaml").read_text())
    assert ft_cfg["train"]["init_from"] == str(run / "checkpoints" / "step-8") and ft_cfg["model"]["dropout"] == 0.0
    # lr 1e-9: the fine-tuned weights are the student's EMA, moved by almost nothing
    ema = weights(run)["emas"]["student"]
    tuned_net = weights(run / "finetune")["nets"]["model"]
    for name, tensor in tuned_net.items():
        if tensor.is_floating_point() and "running" not in name:
            assert torch.allclose(tensor, ema["module." + name], atol=1e-6), name
    # resuming the finished run runs nothing again and reports the same
    again = train(tiny_config(digits_shards, run, "mpl", "roles.student.wait_steps=2", "train.finetune.epochs=1",
                              "train.finetune.steps_per_epoch=3", "train.finetune.batch_size=10", "train.finetune.lr=1e-9",
                              "train.finetune.momentum=0"))
    assert again["finetuned"]["test_accuracy"] == results["finetuned"]["test_accuracy"]


def test_init_from_another_model_is_one_clear_error(digits_shards, tmp_path):
    train(tiny_config(digits_shards, tmp_path / "first", "supervised"))
    with pytest.raises(UserError, match="holds small_cnn for 10 classes .* this run trains mlp"):
        train(tiny_config(digits_shards, tmp_path / "second", "supervised", "model.name=mlp", f"train.init_from={tmp_path / 'first'}"))


def test_deepspeed_is_refused_for_several_optimizers_only():
    check_deepspeed(DistributedType.DEEPSPEED, "fixmatch", ["model"])
    check_deepspeed(DistributedType.MULTI_GPU, "smpl", ["pseudo_step", "model"])
    with pytest.raises(UserError, match="method 'smpl' steps 2 optimizers \\(pseudo_step, model\\); DeepSpeed"):
        check_deepspeed(DistributedType.DEEPSPEED, "smpl", ["pseudo_step", "model"])
