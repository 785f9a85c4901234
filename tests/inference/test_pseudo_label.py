"""Sharded pseudo-labeling: every key of the manifest exactly once at any world size, resumable by
shard with another process count, and one clear error for every bad input."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dist_ssl.config import InferenceConfig
from dist_ssl.data.shards.manifest import load_manifest
from dist_ssl.data.shards.tar import raw_samples
from dist_ssl.engine import preemption
from dist_ssl.errors import UserError
from dist_ssl.inference.jobs import contiguous_blocks
from dist_ssl.inference.pseudo_label import (
    key_hashes,
    load_predictions_manifest,
    pseudo_label,
    read_predictions,
)
from tests.conftest import REPO, accelerate_command, kill_tree, run_cli
from tests.inference.conftest import UNEVEN, repack

FAST = InferenceConfig(batch_size=32, workers=0)


def manifest_keys(split_dir) -> list[str]:
    manifest = load_manifest(split_dir)
    return [raw["__key__"] for shard in manifest.shards for raw in raw_samples(manifest.url(shard))]


def labels_of(folder) -> dict[str, tuple[int, np.ndarray, int]]:
    """key -> (top-1 class, probabilities scattered over all classes, hidden truth)."""
    manifest = load_predictions_manifest(folder)
    table = {}
    for entry in manifest["shards"]:
        preds = read_predictions(folder / entry["file"])
        full = np.zeros((len(preds.keys), manifest["num_classes"]), np.float32)
        np.put_along_axis(full, preds.classes.astype(np.int64), preds.probs, axis=1)
        for key, top, probs, truth in zip(preds.keys, preds.classes[:, 0], full, preds.truth):
            assert key.decode() not in table, f"{key} twice"
            table[key.decode()] = (int(top), probs, int(truth))
    return table


def assert_same_labels(a, b):
    first, second = labels_of(a), labels_of(b)
    assert first.keys() == second.keys()
    for key, (top, probs, _) in first.items():
        assert second[key][0] == top, key
        # other processes may use other thread counts: the same math up to float rounding
        np.testing.assert_allclose(second[key][1], probs, atol=1e-5)


@pytest.fixture(scope="module")
def reference(teacher32, pool7, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "labels"
    pseudo_label(teacher32, pool7, out, FAST)
    return out


def test_contiguous_blocks_cover_every_item_once_balanced_by_size():
    for sizes, parts in [(UNEVEN, 1), (UNEVEN, 2), (UNEVEN, 3), ([5, 5], 3), ([], 2), ([0, 0, 0], 2), ([1] * 10, 4)]:
        blocks = contiguous_blocks(sizes, parts)
        assert len(blocks) == parts and [i for b in blocks for i in b] == list(range(len(sizes)))
        if sum(sizes):
            heaviest = max(sum(sizes[i] for i in b) for b in blocks)
            assert heaviest <= sum(sizes) / parts + max(sizes)
    assert contiguous_blocks(UNEVEN, 2) == [range(0, 4), range(4, 7)]


def test_one_process_labels_every_key_of_the_manifest_once(reference, pool7):
    keys = manifest_keys(pool7)
    assert len(keys) == len(set(keys)) == sum(UNEVEN)
    table = labels_of(reference)
    assert set(table) == set(keys)
    manifest = load_predictions_manifest(reference)
    assert [s["num_samples"] for s in manifest["shards"]] == UNEVEN and manifest["num_samples"] == sum(UNEVEN)
    assert manifest["top_p"] == 10 and manifest["precision"] == "fp32" and manifest["weights"] == "ema"
    stats = manifest["statistics"]
    correct = sum(top == truth for top, _, truth in table.values())
    assert stats["count"] == stats["truth_known"] == sum(UNEVEN)
    assert stats["accuracy"] == pytest.approx(correct / len(table))
    assert stats["mean_confidence"] == pytest.approx(np.mean([p.max() for _, p, _ in table.values()]), rel=1e-5)
    assert sum(stats["class_histogram"]) == sum(stats["confidence_histogram"]["counts"]) == sum(UNEVEN)
    for _, probs, _ in table.values():  # P = all 10 classes: a full distribution, sorted most probable first
        assert probs.sum() == pytest.approx(1, abs=1e-5)


def test_a_finished_job_is_not_redone_and_another_job_is_refused(reference, teacher32, pool7):
    before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir()}
    again = pseudo_label(teacher32, pool7, reference, FAST)
    assert again == load_predictions_manifest(reference)
    assert {p.name: p.stat().st_mtime_ns for p in reference.iterdir()} == before
    with pytest.raises(UserError, match=r"holds pseudo-labels of another job \(top_p is 10 there, 3 here\)"):
        pseudo_label(teacher32, pool7, reference, InferenceConfig(top_p=3, workers=0))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_more_processes_give_the_same_keys_and_labels(world, reference, teacher32, pool7, tmp_path):
    out = tmp_path / "labels"
    result = subprocess.run(
        accelerate_command(world, "pseudo-label", str(teacher32), "--shards", str(pool7), "--out", str(out), "--batch-size", "32", "--workers", "1"),
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"on {world} process(es)" in result.stdout
    assert_same_labels(reference, out)
    assert set(labels_of(out)) == set(manifest_keys(pool7))


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_on_one_process(reference, teacher32, pool7, tmp_path):
    out = tmp_path / "labels"
    victim = subprocess.Popen(
        accelerate_command(2, "pseudo-label", str(teacher32), "--shards", str(pool7), "--out", str(out), "--batch-size", "4", "--workers", "0"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    deadline = time.time() + 300
    while not list(out.glob("predictions-*.npz")) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    kill_tree(victim.pid)
    log, _ = victim.communicate()
    finished = sorted(out.glob("predictions-*.npz"))
    assert 1 <= len(finished) < len(UNEVEN), log
    assert not (out / "manifest.json").exists()
    before = {p.name: p.read_bytes() for p in finished}

    resumed = run_cli("pseudo-label", str(teacher32), "--shards", str(pool7), "--out", str(out), "--workers", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert f"of {len(UNEVEN) - len(finished)} shards ({len(finished)} done before) on 1 process(es)" in resumed.stdout
    for name, data in before.items():  # a finished shard is never recomputed
        assert (out / name).read_bytes() == data
    assert not list(out.glob("*.tmp*"))
    assert_same_labels(reference, out)


def test_a_signal_stops_it_after_the_current_shard_and_the_rerun_finishes(reference, teacher32, pool7, tmp_path):
    out = tmp_path / "labels"
    with preemption.catch_signals():
        os.kill(os.getpid(), signal.SIGUSR1)  # caught before the first shard is done
        with pytest.raises(preemption.Preempted, match=f"stopped by SIGUSR1 after writing 1 of 7 prediction shards to {out}"):
            pseudo_label(teacher32, pool7, out, FAST)
    assert [p.name for p in out.glob("predictions-*.npz")] == ["predictions-000000.npz"] and not (out / "manifest.json").exists()
    pseudo_label(teacher32, pool7, out, FAST)
    assert_same_labels(reference, out)


@pytest.mark.slow
def test_a_rank_without_a_shard_does_not_hang(teacher32, digits32, tmp_path):
    pool = repack(digits32 / "unlabeled", tmp_path / "one-shard", [sum(UNEVEN)])
    out = tmp_path / "labels"
    result = subprocess.run(
        accelerate_command(2, "pseudo-label", str(teacher32), "--shards", str(pool), "--out", str(out), "--workers", "0"),
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "of 1 shards (0 done before) on 2 process(es)" in result.stdout
    assert set(labels_of(out)) == set(manifest_keys(pool))


def test_the_key_hash_ignores_padding_and_tells_keys_apart():
    short = np.array([b"a-1", b"b-22"], dtype="S")
    wide = np.array([b"a-1", b"zzzzzzzzzzzz"], dtype="S")
    assert key_hashes(short)[0] == key_hashes(wide)[0]
    assert len(set(key_hashes(np.array([f"train-{i:08d}".encode() for i in range(5000)])).tolist())) == 5000


# ----------------------------------------------------------------------------------------------
# bad inputs


def pool_with(split_dir, tmp_path, edit) -> object:
    copy = tmp_path / "pool"
    shutil.copytree(split_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(copy, manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_a_shard_shorter_than_its_manifest_says(teacher8, digits_shards, tmp_path):
    def grow(_, manifest):
        manifest["shards"][2]["num_samples"] += 1
        manifest["num_samples"] += 1

    pool = pool_with(digits_shards / "unlabeled", tmp_path, grow)
    with pytest.raises(UserError, match=r"unlabeled-000002.tar does not match its manifest: 100 samples, the manifest says 101"):
        pseudo_label(teacher8, pool, tmp_path / "out", FAST)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_key_in_two_shards_is_found_at_the_synchronization_point(teacher8, digits_shards, tmp_path):
    def duplicate(copy, manifest):
        shutil.copy(copy / manifest["shards"][0]["url"], copy / "twin.tar")
        manifest["shards"].append(dict(manifest["shards"][0], url="twin.tar"))
        manifest["num_samples"] += manifest["shards"][0]["num_samples"]

    pool = pool_with(digits_shards / "unlabeled", tmp_path, duplicate)
    with pytest.raises(UserError, match=r"key 'train-\d+' was labeled 2 times \(in predictions-000000.npz, predictions-000013.npz\); 100 keys repeat"):
        pseudo_label(teacher8, pool, tmp_path / "out", FAST)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_truncated_shard_is_one_error_naming_it(teacher8, digits_shards, tmp_path):
    def truncate(copy, manifest):
        tar = copy / manifest["shards"][1]["url"]
        tar.write_bytes(tar.read_bytes()[:5000])

    pool = pool_with(digits_shards / "unlabeled", tmp_path, truncate)
    with pytest.raises(UserError, match=r"unlabeled-000001.tar is truncated or corrupt after \d+ samples"):
        pseudo_label(teacher8, pool, tmp_path / "out", FAST)


def test_cli_errors_are_one_line(teacher8, tmp_path):
    from dist_ssl.data.shards.writer import write_dataset
    from dist_ssl.data.sources import load_source

    moons = tmp_path / "moons"
    write_dataset(load_source("moons"), moons, labels_per_class=3)
    result = run_cli("pseudo-label", str(teacher8), "--shards", str(moons), "--out", str(tmp_path / "out"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("dist-ssl: error: ") and "(2 classes, input [2]) does not match the checkpoint (10 classes, input [1, 8, 8])" in lines[0]
    result = run_cli("pseudo-label", str(teacher8), "--shards", str(moons), "--out", str(tmp_path / "out"), "--top-p", "0")
    assert result.returncode == 2 and "argument --top-p: must be >= 1; got 0" in result.stderr


def test_bf16_autocast_labels_like_fp32(teacher8, digits_shards, tmp_path):
    fp32 = tmp_path / "fp32"
    bf16 = tmp_path / "bf16"
    pseudo_label(teacher8, digits_shards / "unlabeled", fp32, FAST)
    manifest = pseudo_label(teacher8, digits_shards / "unlabeled", bf16, InferenceConfig(batch_size=32, workers=0, precision="bf16"))
    assert manifest["precision"] == "bf16"
    a, b = labels_of(fp32), labels_of(bf16)
    assert a.keys() == b.keys()
    agree = np.mean([a[k][0] == b[k][0] for k in a])
    assert agree > 0.9, agree  # bf16 rounds logits: near-ties may flip, most labels may not
    with pytest.raises(UserError, match=r"holds pseudo-labels of another job \(precision is 'bf16' there, 'fp32' here\)"):
        pseudo_label(teacher8, digits_shards / "unlabeled", bf16, FAST)


def test_a_corrupt_sample_is_skipped_listed_and_selection_still_finds_the_right_images(teacher8, digits_shards, tmp_path):
    import tarfile

    from dist_ssl.config import SelectConfig
    from dist_ssl.data.shards.manifest import sha256_file
    from dist_ssl.inference.select import select

    victim = {}

    def corrupt_one(copy, manifest):
        entry = manifest["shards"][3]
        path = copy / entry["url"]
        with tarfile.open(path) as src:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as dst:
            for member, data in members:
                if member.name.endswith(".png") and not victim:  # the shard's first image no longer decodes
                    victim["key"] = member.name.split(".")[0]
                    data = b"not a png" + data[9:]
                dst.addfile(member, io.BytesIO(data))
        entry["sha256"], entry["bytes"] = sha256_file(path), path.stat().st_size

    pool = pool_with(digits_shards / "unlabeled", tmp_path, corrupt_one)
    manifest = pseudo_label(teacher8, pool, tmp_path / "labels", FAST)
    assert manifest["corrupt_samples"] == 1 and manifest["num_samples"] == load_manifest(pool).num_samples - 1
    shard = read_predictions(tmp_path / "labels" / "predictions-000003.npz")
    assert [k.decode() for k in shard.skipped] == [victim["key"]] and victim["key"] not in labels_of(tmp_path / "labels")
    assert shard.positions[0] == 1  # rows after the corrupt sample keep their place in the shard
    everything = select(tmp_path / "labels", tmp_path / "all", SelectConfig(policy="all"))
    assert everything["num_samples"] == manifest["num_samples"]  # every key matched the image at its position
    with pytest.raises(UserError, match=r"were corrupt, more than data.max_bad_fraction=0.0 allows"):
        pseudo_label(teacher8, pool, tmp_path / "strict", InferenceConfig(batch_size=32, workers=0, max_bad_fraction=0.0))


PROGRESS_LINE = re.compile(r"pseudo-label (\d+)/(\d+) samples \((\d+)%\) \| (\d+) samples/s \| ETA \d+:\d\d:\d\d")


def progress(text: str) -> list[tuple[int, int]]:
    """(done, total) of each progress line."""
    lines = [line for line in text.splitlines() if line.startswith("pseudo-label ")]
    found = [PROGRESS_LINE.fullmatch(line) for line in lines]
    assert all(found), lines
    return [(int(m.group(1)), int(m.group(2))) for m in found]


def test_the_command_prints_a_progress_line_per_interval(teacher8, digits_shards, tmp_path):
    """Interval 0 s: a line after every batch, on stderr (a pipe here, as in a log)."""
    pool = load_manifest(digits_shards / "unlabeled")
    done = run_cli("pseudo-label", str(teacher8), "--shards", str(digits_shards), "--out", str(tmp_path / "out"), "--batch-size", "64",
                   env={"DIST_SSL_PROGRESS_SECONDS": "0"})
    assert done.returncode == 0, done.stderr
    lines = progress(done.stderr)
    assert len(lines) == sum(-(-s.num_samples // 64) for s in pool.shards)
    assert {total for _, total in lines} == {pool.num_samples}
    assert [d for d, _ in lines] == sorted({d for d, _ in lines}) and lines[-1][0] == pool.num_samples
    print(done.stderr.splitlines()[-1])


def test_a_progress_line_every_n_batches(teacher8, digits_shards, tmp_path, monkeypatch, capsys):
    from dist_ssl.inference import pseudo_label as module

    monkeypatch.setattr(module, "LINE_EVERY_BATCHES", 2)
    pseudo_label(teacher8, digits_shards / "unlabeled", tmp_path / "out", InferenceConfig(batch_size=64, workers=0))
    done = [d for d, _ in progress(capsys.readouterr().err)]
    assert done[-1] == load_manifest(digits_shards / "unlabeled").num_samples
    gaps = np.diff([0, *done[:-1]])
    assert len(done) > 3 and all(128 <= gap < 128 + 64 for gap in gaps)  # 2 batches of 64, or a shard's short batch more


def test_a_full_disk_keeps_the_published_shards_and_the_rerun_finishes(reference, teacher32, pool7, tmp_path):
    """The output disk (a real 64 KiB tmpfs) fills up half-way: one line, exit 2, every published
    prediction shard whole and no temporary file; with room again the same command labels only the
    rest, and the labels are those of an uninterrupted run."""
    from tests.test_files import private_mounts

    if private_mounts('mount -t tmpfs -o size=64k tmpfs "$1"', str(tmp_path)).returncode != 0:
        pytest.skip("no private tmpfs mounts here")
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    kept.mkdir()
    command = f"{sys.executable} -m dist_ssl pseudo-label {teacher32} --shards {pool7} --out {disk / 'labels'} --workers 0"
    script = f'''
        mount -t tmpfs -o size=64k tmpfs "$1" || exit 99
        {command} > "$2/full.out" 2> "$2/full.err"; echo $? > "$2/full.rc"
        cp -a "$1/labels" "$2/after-full"
        mount -o remount,size=4m "$1"
        {command} > "$2/again.out" 2>&1; echo $? > "$2/again.rc"
        cp -a "$1/labels" "$2/labels"
    '''
    done = private_mounts(script, str(disk), str(kept))
    assert done.returncode == 0, done.stderr
    err = (kept / "full.err").read_text()
    assert int((kept / "full.rc").read_text()) == 2, err
    (line,) = [line for line in err.splitlines() if line.startswith("dist-ssl:")]
    assert line.startswith(f"dist-ssl: error: cannot write {disk / 'labels'}/") and line.endswith("No space left on device"), line
    published = sorted(p.name for p in (kept / "after-full").glob("predictions-*.npz"))
    assert 1 <= len(published) < len(UNEVEN) and not list((kept / "after-full").glob("*.tmp*"))
    for name in published:  # whole files, identical to the uninterrupted run's
        assert (kept / "after-full" / name).read_bytes() == (reference / name).read_bytes()
    again = (kept / "again.out").read_text()
    assert int((kept / "again.rc").read_text()) == 0, again
    assert f"({len(published)} done before)" in again
    assert_same_labels(reference, kept / "labels")
