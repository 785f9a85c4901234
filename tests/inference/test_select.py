"""Selection: each policy keeps exactly what it promises, the result is a labeled split that
`dist-ssl train` reads (soft targets included), and an interrupted selection resumes by shard."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch

from dist_ssl.config import InferenceConfig, SelectConfig
from dist_ssl.data.shards.manifest import load_manifest, sha256_file
from dist_ssl.data.shards.tar import raw_samples
from dist_ssl.data.streams import TrainStream
from dist_ssl.data.transforms import View
from dist_ssl.engine import preemption
from dist_ssl.engine.loop import train
from dist_ssl.errors import UserError
from dist_ssl.inference.pseudo_label import (
    load_predictions_manifest,
    pseudo_label,
    read_predictions,
)
from dist_ssl.inference.select import select
from tests.conftest import run_cli, tiny_config


@pytest.fixture(scope="module")
def labels8(teacher8, digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels8") / "labels"
    pseudo_label(teacher8, digits_shards / "unlabeled", out, InferenceConfig(batch_size=64, workers=0))
    return out


def predictions(folder) -> list[tuple[str, np.ndarray, np.ndarray, int]]:
    """(key, classes, probs, truth) of every pool sample."""
    rows = []
    for entry in load_predictions_manifest(folder)["shards"]:
        preds = read_predictions(folder / entry["file"])
        rows += [(k.decode(), c, p, int(t)) for k, c, p, t in zip(preds.keys, preds.classes, preds.probs, preds.truth)]
    return rows


def written(split_dir) -> list[dict]:
    manifest = load_manifest(split_dir)
    samples = []
    for shard in manifest.shards:
        path = split_dir / shard.url
        assert sha256_file(path) == shard.sha256 and path.stat().st_size == shard.bytes
        found = list(raw_samples(str(path)))
        assert len(found) == shard.num_samples
        samples += found
    assert len(samples) == manifest.num_samples
    return samples


def test_top_k_keeps_the_k_best_scored_samples_of_every_class(labels8, tmp_path):
    out = tmp_path / "top30"
    manifest = select(labels8, out, SelectConfig(policy="top_k", top_k=30, maxcount=64))
    rows = predictions(labels8)
    expected = set()
    for cls in range(10):
        scored = [(-float(p[list(c).index(cls)]), key) for key, c, p, _ in rows if cls in c]
        expected |= {(key, cls) for _, key in sorted(scored)[:30]}
    samples = written(out)
    got = {(s["__key__"].split("-c")[0], int(s["cls"])) for s in samples}
    assert got == expected and len(samples) == 300
    assert len({s["__key__"] for s in samples}) == 300  # an image picked for two classes gets two keys
    assert manifest["class_histogram"] == [30] * 10 and manifest["targets"] == "hard"
    assert all(shard["num_samples"] <= 64 for shard in manifest["shards"]) and len(manifest["shards"]) == 5
    truth = {key: t for key, _, _, t in rows}
    stats = manifest["pseudo_labels"]["statistics"]
    assert stats["accuracy"] == pytest.approx(np.mean([truth[k] == c for k, c in got]))
    assert all(int(s["truth.cls"]) == truth[s["__key__"].split("-c")[0]] for s in samples)


def test_threshold_sample_rate_and_all(labels8, tmp_path):
    rows = predictions(labels8)
    top = [(key, int(c[0]), float(p[0])) for key, c, p, _ in rows]
    cut = float(np.median([conf for _, _, conf in top]))
    kept = select(labels8, tmp_path / "threshold", SelectConfig(policy="threshold", threshold=cut))
    assert {(s["__key__"], int(s["cls"])) for s in written(tmp_path / "threshold")} == {(k, c) for k, c, conf in top if conf >= cut}
    assert kept["pseudo_labels"]["statistics"]["mean_confidence"] >= cut

    select(labels8, tmp_path / "rate", SelectConfig(policy="sample_rate", sample_rate=0.25))
    counts = np.bincount([c for _, c, _ in top], minlength=10)
    by_class = {}
    for s in written(tmp_path / "rate"):
        by_class.setdefault(int(s["cls"]), []).append(s["__key__"])
    confidence = {k: conf for k, _, conf in top}
    for cls, keys in by_class.items():
        assert len(keys) == int(np.ceil(counts[cls] * 0.25))
        others = [conf for k, c, conf in top if c == cls and k not in keys]
        assert not others or min(confidence[k] for k in keys) >= max(others)  # the most confident of the class

    everything = select(labels8, tmp_path / "all", SelectConfig(policy="all"))
    assert everything["num_samples"] == len(rows)


def test_soft_targets_and_the_labels_make_a_split_that_trains(labels8, digits_shards, tmp_path):
    out = tmp_path / "soft"
    manifest = select(labels8, out, SelectConfig(policy="top_k", top_k=20, soft=True, maxcount=100), digits_shards / "labeled")
    samples = written(out)
    labeled_keys = [raw["__key__"] for shard in load_manifest(digits_shards / "labeled").shards
                    for raw in raw_samples(str(digits_shards / "labeled" / shard.url))]
    assert manifest["num_samples"] == 200 + 50 and manifest["targets"] == "soft"
    assert manifest["pseudo_labels"]["labeled_included"] == 50
    assert set(labeled_keys) <= {s["__key__"] for s in samples}
    for shard in manifest["shards"]:  # the labels are spread over the shards, not one block
        assert shard["num_samples"] in (83, 84)
    truths = {key: (c, p) for key, c, p, _ in predictions(labels8)}
    for s in samples:
        target = np.load(io.BytesIO(s["soft.npy"]), allow_pickle=False)
        assert target.shape == (10,) and target.sum() == pytest.approx(1, abs=1e-5)
        if s["__key__"] in labeled_keys:
            assert target[int(s["cls"])] == 1
        else:
            classes, probs = truths[s["__key__"].split("-c")[0]]
            np.testing.assert_allclose(target[classes], probs / probs.sum(), atol=1e-6)

    # the training stream hands the class probabilities over with the batch (the loop's labeled target)
    stream = TrainStream(load_manifest(out), 16, {"weak": View(lambda x: x, lambda x: x.float())}, 0, 1, 0, seed=1, shuffle_buffer=50)
    batch = next(iter(stream))
    assert batch["soft"].shape == (16, 10)
    assert torch.allclose(batch["soft"].sum(dim=1), torch.ones(16))
    results = train(tiny_config(digits_shards, tmp_path / "student", "supervised", f"data.labeled={out}", "data.workers=0"))
    assert results["labels"] == 250 and 0 <= results["test_accuracy"] <= 1


def test_an_interrupted_selection_resumes_by_shard(labels8, tmp_path):
    out = tmp_path / "sel"
    first = select(labels8, out, SelectConfig(policy="top_k", top_k=12, maxcount=40))
    data = {p.name: p.read_bytes() for p in out.glob("selected-*.tar")}
    # the state a crash leaves: shard 1 written but not marked finished, shard 2 not written, no manifest
    (out / "selected-000001.json").unlink()
    (out / "selected-000002.tar").unlink()
    (out / "selected-000002.json").unlink()
    (out / "manifest.json").unlink()
    (out / "selected-000003.tar.tmp99").write_bytes(b"half a shard")
    second = select(labels8, out, SelectConfig(policy="top_k", top_k=12, maxcount=40))
    assert second == first
    assert {p.name: p.read_bytes() for p in out.glob("selected-*.tar")} == data  # byte-identical shards
    assert not list(out.glob("*.tmp*"))


def test_a_signal_stops_it_after_the_current_shard_and_the_rerun_finishes(labels8, tmp_path):
    whole = select(labels8, tmp_path / "whole", SelectConfig(policy="top_k", top_k=12, maxcount=40))
    out = tmp_path / "sel"
    with preemption.catch_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # caught before the first shard is written
        with pytest.raises(preemption.Preempted, match=f"stopped by SIGTERM after writing 1 of 3 selected shards to {out}"):
            select(labels8, out, SelectConfig(policy="top_k", top_k=12, maxcount=40))
    assert [p.name for p in out.glob("selected-*.tar")] == ["selected-000000.tar"] and not (out / "manifest.json").exists()
    again = select(labels8, out, SelectConfig(policy="top_k", top_k=12, maxcount=40))
    assert {k: v for k, v in again.items() if k != "output"} == {k: v for k, v in whole.items() if k != "output"}
    assert {p.name: p.read_bytes() for p in out.glob("selected-*.tar")} == {p.name: p.read_bytes() for p in (tmp_path / "whole").glob("selected-*.tar")}


def test_bad_inputs(labels8, digits_shards, tmp_path):
    with pytest.raises(UserError, match="holds no pseudo-labels"):
        select(tmp_path, tmp_path / "x", SelectConfig())
    unfinished = tmp_path / "unfinished"
    shutil.copytree(labels8, unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"holds an unfinished pseudo-label job \(run it again to finish it\)"):
        select(unfinished, tmp_path / "y", SelectConfig())
    with pytest.raises(UserError, match=r"the selection is empty: no sample of .* passes policy"):
        select(labels8, tmp_path / "z", SelectConfig(policy="threshold", threshold=1.0))
    select(labels8, tmp_path / "k", SelectConfig(top_k=5))
    with pytest.raises(UserError, match=r"holds a selection of another job \(top_k is 5 there, 6 here\)"):
        select(labels8, tmp_path / "k", SelectConfig(top_k=6))
    changed = tmp_path / "changed-pool"
    shutil.copytree(digits_shards / "unlabeled", changed)
    moved = tmp_path / "moved-labels"
    shutil.copytree(labels8, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["pool"] = str(changed)
    (moved / "manifest.json").write_text(json.dumps(manifest))
    (changed / "manifest.json").write_text((changed / "manifest.json").read_text().replace('"seed": 0', '"seed": 1'))
    with pytest.raises(UserError, match=r"changed after it was pseudo-labeled into .*: pseudo-label it again"):
        select(moved, tmp_path / "w", SelectConfig())


def test_the_command_line(labels8, tmp_path):
    out = tmp_path / "cli"
    done = run_cli("select", str(labels8), "--out", str(out), "--policy", "sample_rate", "--sample-rate", "0.5", "--soft")
    assert done.returncode == 0, done.stderr
    assert "selected " in done.stdout and load_manifest(out).data["targets"] == "soft"
    wrong = run_cli("select", str(labels8), "--out", str(tmp_path / "x"), "--policy", "threshold", "--threshold", "1.5")
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        "dist-ssl: error: argument --threshold: must be in [0, 1]; got 1.5 (see `dist-ssl select --help`)"]


def test_the_command_prints_a_progress_line_about_every_output_shard(labels8, tmp_path):
    done = run_cli("select", str(labels8), "--out", str(tmp_path / "all"), "--policy", "all", "--maxcount", "300")
    assert done.returncode == 0, done.stderr
    total = load_manifest(tmp_path / "all").num_samples
    pattern = re.compile(rf"select (\d+)/{total} samples \((\d+)%\) \| (\d+) samples/s \| ETA \d+:\d\d:\d\d")
    lines = [pattern.fullmatch(line) for line in done.stderr.splitlines() if line.startswith("select ")]
    assert all(lines), done.stderr
    assert [int(m.group(1)) for m in lines] == [*range(300, total, 300), total]
    print(done.stderr.splitlines()[-1])
