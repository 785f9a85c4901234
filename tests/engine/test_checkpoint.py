import json

import pytest
import torch

from dist_ssl.engine import checkpoint
from dist_ssl.engine.accelerator import make_accelerator
from dist_ssl.errors import UserError


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
    assert not list(folder.glob("*.tmp"))


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
