import json

import pytest
import torch

from dist_ssl.engine import checkpoint
from dist_ssl.engine.accelerator import make_accelerator
from dist_ssl.errors import UserError
from dist_ssl.files import CannotWrite


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator()


def save(accelerator, root, step, keep_last=2, value=1.0):
    return checkpoint.save(root, step, accelerator, {"model": {"w": torch.full((3,), value)}}, {"rng": checkpoint.rng_state()},
                           {"method": "m"}, "train: {}\n", keep_last)


def test_commit_protocol_and_pruning(tmp_path, accelerator):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save(accelerator, root, step)
    assert [s for s, _ in checkpoint.committed(root)] == [20, 30]
    folder = root / "step-30"
    assert {p.name for p in folder.iterdir()} == {"model.pt", "rank-00000.pt", "config.yaml", "meta.json", checkpoint.MARKER}
    assert json.loads((folder / "meta.json").read_text())["format"] == checkpoint.FORMAT
    assert not list(folder.glob("*.tmp*"))


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, accelerator):
    root = tmp_path / "checkpoints"
    save(accelerator, root, 10)
    leftover = root / "step-20"  # what a crash before the marker leaves
    leftover.mkdir()
    (leftover / "model.pt").write_bytes(b"half a file")
    assert checkpoint.latest(root) == root / "step-10"
    with pytest.raises(UserError, match="incomplete"):
        checkpoint.check_ours(leftover)
    save(accelerator, root, 20, value=2.0)  # the step is redone: the leftover is replaced
    assert checkpoint.latest(root) == leftover
    assert torch.equal(checkpoint.load_file(leftover / "model.pt")["w"], torch.full((3,), 2.0))


def test_the_newest_is_never_pruned(tmp_path, accelerator):
    root = tmp_path / "checkpoints"
    save(accelerator, root, 10, keep_last=1)
    save(accelerator, root, 20, keep_last=1)
    assert [s for s, _ in checkpoint.committed(root)] == [20]


def test_resolve_accepts_run_folders_and_refuses_strangers(tmp_path, accelerator):
    save(accelerator, tmp_path / "run" / "checkpoints", 5)
    assert checkpoint.resolve(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step-5"
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="is not a dist-ssl checkpoint"):
        checkpoint.resolve(stranger)
    with pytest.raises(UserError, match="checkpoint not found"):
        checkpoint.resolve(tmp_path / "nowhere")


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_loading_never_executes_code(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="cannot be read safely"):
        checkpoint.load_file(tmp_path / "evil.pt")


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = checkpoint.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_pruning_renames_before_deleting_and_cleans_its_leftovers(tmp_path, accelerator):
    root = tmp_path / "checkpoints"
    save(accelerator, root, 10, keep_last=1)
    # What a crash in the middle of pruning step-5 leaves: a renamed, half-deleted folder.
    leftover = root / "step-5.pruned"
    leftover.mkdir()
    (leftover / checkpoint.MARKER).write_text("5\n")
    assert [s for s, _ in checkpoint.committed(root)] == [10]
    save(accelerator, root, 20, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-20"]


def build_parts(model_overrides=(), optimizer="sgd", ema=True, scaler=True):
    """Real networks, optimizers, schedules, EMA and a CPU GradScaler for the role 'model'."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from dist_ssl.config import load_config
    from dist_ssl.engine.optim import build_optimizer, build_scheduler
    from dist_ssl.models import build_model

    cfg = load_config(None, ["model.name=mlp", f"optim.name={optimizer}", *model_overrides])
    torch.manual_seed(0)
    nets = {"model": build_model(cfg.model, 2, (2,))}
    optimizers = {r: build_optimizer(n, cfg.optim) for r, n in nets.items()}
    schedulers = {r: build_scheduler(o, 100, cfg.optim) for r, o in optimizers.items()}
    emas = {r: AveragedModel(n, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True) for r, n in nets.items()} if ema else {}
    return nets, emas, optimizers, schedulers, torch.amp.GradScaler("cpu") if scaler else None


def take_steps(nets, emas, optimizers, schedulers, scaler, steps=3):
    for _ in range(steps):
        loss = nets["model"](torch.randn(4, 2)).logsumexp(1).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizers["model"])
        scaler.update()
        schedulers["model"].step()
        optimizers["model"].zero_grad()
        emas["model"].update_parameters(nets["model"])


def test_snapshot_and_restore_round_trip_every_piece_by_role(tmp_path, accelerator):
    parts = build_parts()
    nets, emas, optimizers, schedulers, scaler = parts
    take_steps(*parts)
    scaler.update(new_scale=1024.0)  # a scale the fresh scaler does not start from
    counters = {"step": 3, "wall_seconds": 1.5, "history": []}
    checkpoint.save(tmp_path, 3, accelerator, checkpoint.snapshot(*parts, counters), {"method": {"baseline": torch.tensor(0.5)}},
                    {"method": "m"}, "train: {}\n", 2)

    fresh = build_parts()
    restored, mine = checkpoint.restore(tmp_path / "step-3", 0, *fresh)
    assert restored == counters and torch.equal(mine["method"]["baseline"], torch.tensor(0.5))
    assert fresh[4].get_scale() == 1024.0 and fresh[4].state_dict() == scaler.state_dict()
    assert fresh[3]["model"].state_dict() == schedulers["model"].state_dict()
    for a, b in ((nets, fresh[0]), (emas, fresh[1])):
        for name, tensor in a["model"].state_dict().items():
            assert torch.equal(tensor, b["model"].state_dict()[name]), name
    # Restored optimizer state continues exactly: one more step on both gives the same weights.
    torch.manual_seed(1)
    take_steps(*parts, steps=1)
    torch.manual_seed(1)
    take_steps(*fresh, steps=1)
    for name, tensor in nets["model"].state_dict().items():
        assert torch.equal(tensor, fresh[0]["model"].state_dict()[name]), name


@pytest.mark.parametrize("change, message", [
    (dict(model_overrides=["model.hidden_sizes=[16,8]"]), r"model network tensor 'net.0.bias' is \[8\] there, \[16\] here"),
    (dict(optimizer="adamw"), "the model optimizer is SGD there, AdamW here"),
])
def test_restore_refuses_what_does_not_fit_and_names_it(tmp_path, accelerator, change, message):
    parts = build_parts()
    checkpoint.save(tmp_path, 1, accelerator, checkpoint.snapshot(*parts, {}), {}, {}, "train: {}\n", 2)
    with pytest.raises(UserError, match=message):
        checkpoint.restore(tmp_path / "step-1", 0, *build_parts(**change))


def test_a_missing_rank_file_is_one_clear_error(tmp_path, accelerator):
    parts = build_parts()
    checkpoint.save(tmp_path, 1, accelerator, checkpoint.snapshot(*parts, {}), {}, {"world_size": 1}, "train: {}\n", 2)
    with pytest.raises(UserError, match="was written by 1 processes but holds no state for rank 1: a file is missing"):
        checkpoint.restore(tmp_path / "step-1", 1, *build_parts())


def test_config_changes_name_what_alters_the_run_and_skip_bookkeeping(tmp_path):
    from dist_ssl.config import load_config, save_config, to_dict

    save_config(load_config(None, []), tmp_path / "config.yaml")
    changed = load_config(None, ["optim.lr=0.1", "train.keep_last=7", "train.checkpoint_every_steps=50", "train.output_dir=elsewhere"])
    assert checkpoint.config_changes(tmp_path, to_dict(changed)) == ["optim.lr: 0.03 -> 0.1"]


def test_a_crash_just_before_the_marker_leaves_the_previous_checkpoint_resumed(digits_shards, tmp_path, monkeypatch, capsys):
    """Every file of step-6 is written and fsynced, then the disk fills up while the marker is
    written: one clear error, the partial folder is removed, step-4 is resumed, and the run ends as
    if nothing happened."""
    from dist_ssl.engine.loop import train
    from tests.conftest import assert_same_checkpoint, tiny_config

    overrides = ("model.dropout=0.3", "train.checkpoint_every_steps=3", "train.keep_last=1")
    train(tiny_config(digits_shards, tmp_path / "reference", "fixmatch", *overrides))
    run = tmp_path / "run"
    write_text = checkpoint.atomic_write_text

    def disk_full_at_the_marker_of_step_6(path, text):
        if path.name == checkpoint.MARKER and path.parent.name == "step-6":
            path.with_name(path.name + ".tmp").write_text(text[:1])
            raise OSError(28, "No space left on device")
        write_text(path, text)

    monkeypatch.setattr(checkpoint, "atomic_write_text", disk_full_at_the_marker_of_step_6)
    with pytest.raises(CannotWrite, match=f"^cannot write {run / 'checkpoints' / 'step-6'}: No space left on device$"):
        train(tiny_config(digits_shards, run, "fixmatch", *overrides))
    monkeypatch.undo()
    assert not (run / "checkpoints" / "step-6").exists()  # never left as a candidate
    assert checkpoint.latest(run / "checkpoints") == run / "checkpoints" / "step-4"  # keep_last=1 kept the newest committed

    capsys.readouterr()
    train(tiny_config(digits_shards, run, "fixmatch", *overrides))
    assert f"resumed from {run / 'checkpoints' / 'step-4'} at step 4" in capsys.readouterr().out
    assert_same_checkpoint(tmp_path / "reference" / "checkpoints" / "step-8", run / "checkpoints" / "step-8")


def test_a_fresh_run_into_a_folder_with_committed_checkpoints_is_refused_and_loses_nothing(digits_shards, tmp_path):
    """`save` keeps a step-N folder that is already committed, so a fresh run (resume=never) or a
    run started from an older checkpoint would mix its checkpoints with the other run's."""
    from tests.conftest import run_cli

    run = tmp_path / "run"
    args = ("train", "configs/digits/supervised.yaml", f"data.shards={digits_shards}", f"train.output_dir={run}",
            "train.epochs=2", "train.steps_per_epoch=3", "train.keep_last=2", "data.workers=0")
    assert run_cli(*args).returncode == 0
    before = {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}
    assert [s for s, _ in checkpoint.committed(run / "checkpoints")] == [3, 6]
    for resume, start in (("never", 0), (str(run / "checkpoints" / "step-3"), 3)):
        refused = run_cli(*args, f"train.resume={resume}")
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [
            f"dist-ssl: error: {run / 'checkpoints'} already holds committed checkpoints newer than this run's start at step {start} "
            f"(train.resume={resume}), up to step-6: they would mix with this run's; use another train.output_dir or move {run / 'checkpoints'} away"
        ]
    assert {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()} == before
    assert run_cli(*args, f"train.resume={run / 'checkpoints' / 'step-6'}").returncode == 0  # from the newest: nothing to mix
