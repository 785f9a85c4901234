import json
import shutil
import tarfile

import pytest
import torch

from dist_ssl.data.shards.manifest import load_manifest, sha256_file
from dist_ssl.engine import checkpoint
from dist_ssl.engine.loop import train
from dist_ssl.errors import UserError
from tests.conftest import tiny_config


def weights(run_dir):
    folder = checkpoint.latest(run_dir / "checkpoints")
    return checkpoint.load_file(folder / "model.pt")


def assert_same_weights(a, b):
    for part in ("nets", "emas"):
        for role in a[part]:
            for name, tensor in a[part][role].items():
                assert torch.equal(tensor, b[part][role][name]), f"{part}/{role}/{name}"


def test_a_run_writes_everything_a_user_looks_for(digits_shards, tmp_path):
    results = train(tiny_config(digits_shards, tmp_path / "run"))
    run = tmp_path / "run"
    saved = json.loads((run / "results.json").read_text())
    assert saved == results
    for key in ("method", "dataset", "labels", "test_accuracy", "test_loss", "steps", "world_size", "wall_seconds", "train_samples_per_second"):
        assert key in saved
    assert saved["labels"] == 50 and saved["steps"] == 8 and saved["world_size"] == 1 and saved["dataset"] == "digits"
    assert 0 <= saved["test_accuracy"] <= 1
    assert (run / "config.yaml").is_file()
    assert [s for s, _ in checkpoint.committed(run / "checkpoints")] == [4, 8]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/mask_rate", "train/pseudo_label_accuracy", "eval/accuracy", "eval/loss"} <= tags


def test_resume_from_a_middle_checkpoint_ends_identical(digits_shards, tmp_path):
    """An uninterrupted run, and a run resumed from its epoch-1 checkpoint, end bit-identical."""
    train(tiny_config(digits_shards, tmp_path / "full", "fixmatch", "train.keep_last=5"))
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-4", resumed / "step-4")
    results = train(tiny_config(digits_shards, tmp_path / "resumed", "fixmatch", "train.keep_last=5"))
    assert results["steps"] == 8
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "resumed"))


def test_finished_run_resumes_at_its_end(digits_shards, tmp_path):
    cfg = tiny_config(digits_shards, tmp_path / "run", "supervised")
    first = train(cfg)
    again = train(cfg)
    assert again["test_accuracy"] == first["test_accuracy"] and again["train_samples_per_second"] is None


def scramble_truth(shards, out):
    """A copy of the dataset whose unlabeled split has every hidden truth label changed."""
    shutil.copytree(shards, out)
    manifest_path = out / "unlabeled" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for shard in manifest["shards"]:
        path = out / "unlabeled" / shard["url"]
        with tarfile.open(path) as src:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
        with tarfile.open(path, "w") as dst:
            for member, data in members:
                if member.name.endswith(".truth.cls"):
                    data = str((int(data) + 3) % 10).encode()
                    member.size = len(data)
                import io

                dst.addfile(member, io.BytesIO(data))
        shard["sha256"], shard["bytes"] = sha256_file(path), path.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("method", ["fixmatch", "pseudo_label"])
def test_hidden_truth_never_reaches_a_loss(digits_shards, tmp_path, method):
    overrides = ("method.pseudo_label.ramp_start_epoch=0", "method.pseudo_label.ramp_end_epoch=1")
    honest = train(tiny_config(digits_shards, tmp_path / "a", method, *overrides))
    scrambled = scramble_truth(digits_shards, tmp_path / "scrambled")
    assert load_manifest(scrambled / "unlabeled").num_samples == load_manifest(digits_shards / "unlabeled").num_samples
    lying = train(tiny_config(scrambled, tmp_path / "b", method, *overrides))
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert honest["test_loss"] == lying["test_loss"]


def test_incompatible_checkpoint_is_refused(digits_shards, tmp_path):
    train(tiny_config(digits_shards, tmp_path / "run", "supervised"))
    with pytest.raises(UserError, match="incompatible with this config: model is 'small_cnn' there, 'mlp' here"):
        train(tiny_config(digits_shards, tmp_path / "run", "supervised", "model.name=mlp"))


def test_batch_must_split_over_ranks(digits_shards, tmp_path):
    cfg = tiny_config(digits_shards, tmp_path / "run", "fixmatch", "data.unlabeled_batch_ratio=0")
    with pytest.raises(UserError, match="needs unlabeled data"):
        train(cfg)


def test_init_from_starts_every_network_from_another_runs_evaluated_weights(digits_shards, tmp_path):
    train(tiny_config(digits_shards, tmp_path / "source", "supervised"))
    evaluated, is_ema = checkpoint.network_weights(checkpoint.latest(tmp_path / "source" / "checkpoints"))
    assert is_ema  # the digits configs keep an EMA: that is what was evaluated, so that is what starts the new run
    # a step this small moves no parameter measurably: the new run's weights are where it started
    train(tiny_config(digits_shards, tmp_path / "tuned", "supervised", f"train.init_from={tmp_path / 'source'}", "optim.lr=1e-12",
                      "optim.momentum=0", "optim.weight_decay=0", "train.epochs=1", "train.steps_per_epoch=1"))
    tuned = weights(tmp_path / "tuned")["nets"]["model"]
    parameters = [name for name in evaluated if "running" not in name and "num_batches" not in name]
    assert parameters
    for name in parameters:
        assert torch.allclose(tuned[name], evaluated[name], atol=1e-7), name

    train(tiny_config(digits_shards, tmp_path / "mlp", "supervised", "model.name=mlp", "train.epochs=1", "train.steps_per_epoch=1"))
    with pytest.raises(UserError, match=r"train.init_from=.*mlp: that checkpoint holds mlp for 10 classes .* this run trains small_cnn"):
        train(tiny_config(digits_shards, tmp_path / "other", "supervised", f"train.init_from={tmp_path / 'mlp'}"))
