import errno
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest

from dist_ssl.data.shards.codec import decode_sample
from dist_ssl.data.shards.manifest import load_manifest, sha256_file
from dist_ssl.data.shards.tar import RETRIES, ShardReader, raw_samples
from dist_ssl.data.shards.verify import verify
from dist_ssl.data.shards.writer import write_dataset
from dist_ssl.data.sources import load_source
from dist_ssl.errors import UserError
from tests.conftest import run_cli


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


def test_round_trip_counts_hashes_and_fields(digits_shards):
    seen_keys = {}
    for split in ("labeled", "unlabeled", "test"):
        manifest = load_manifest(digits_shards / split)
        assert manifest.num_samples == sum(s.num_samples for s in manifest.shards)
        keys = []
        for shard in manifest.shards:
            path = digits_shards / split / shard.url
            assert sha256_file(path) == shard.sha256 and path.stat().st_size == shard.bytes
            samples = list(raw_samples(str(path)))
            assert len(samples) == shard.num_samples
            keys += [s["__key__"] for s in samples]
            for sample in samples:
                # the hidden truth lives in its own field, only in the unlabeled split
                assert ("truth.cls" in sample) == (split == "unlabeled")
                assert ("cls" in sample) == (split != "unlabeled")
                assert "png" in sample
        assert len(keys) == len(set(keys)) == manifest.num_samples
        seen_keys[split] = set(keys)
    assert not seen_keys["labeled"] & seen_keys["unlabeled"]
    assert not seen_keys["test"] & (seen_keys["labeled"] | seen_keys["unlabeled"])
    labeled = load_manifest(digits_shards / "labeled")
    assert labeled.data["class_histogram"] == [5] * 10
    assert labeled.data["protocol"] == {"labels_per_class": 5, "seed": 0, "test_fraction": 0.3}
    assert sum(load_manifest(digits_shards / "unlabeled").data["truth_histogram"]) == 1797 - 540 - 50


def test_shards_are_reproducible(tmp_path):
    write_dataset(load_source("moons"), tmp_path / "a", labels_per_class=3, seed=4, maxcount=500)
    write_dataset(load_source("moons"), tmp_path / "b", labels_per_class=3, seed=4, maxcount=500)
    for split in ("labeled", "unlabeled", "test"):
        a, b = (json.loads((tmp_path / d / split / "manifest.json").read_text()) for d in "ab")
        assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_vector_samples_are_npy_without_pickle(tmp_path):
    write_dataset(load_source("moons"), tmp_path / "m", labels_per_class=3, seed=0)
    manifest = load_manifest(tmp_path / "m" / "labeled")
    assert manifest.kind == "vector" and manifest.shape == (2,) and manifest.num_samples == 6
    names = members(tmp_path / "m" / "labeled" / manifest.shards[0].url)
    assert all(n.endswith((".npy", ".cls")) for n in names)


def test_refuses_to_overwrite_a_dataset(digits_shards):
    before = sorted(p.name for p in digits_shards.iterdir())
    with pytest.raises(UserError, match="output folder already exists and is not empty"):
        write_dataset(load_source("digits"), digits_shards, labels_per_class=5)
    assert sorted(p.name for p in digits_shards.iterdir()) == before


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(UserError):
        write_dataset(load_source("digits"), tmp_path / "d", labels_per_class=500)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, message", [(None, "shard folder not found"), ("{}", "is not a dist-ssl manifest"), ("{", "is not valid JSON")])
def test_bad_manifests(tmp_path, content, message):
    folder = tmp_path / "split"
    if content is not None:
        folder.mkdir()
        (folder / "manifest.json").write_text(content)
    with pytest.raises(UserError, match=message):
        load_manifest(folder)


def test_decoded_images_match_the_source(digits_shards):
    from dist_ssl.data.shards.codec import decode_sample

    source = load_source("digits")
    raw = next(raw_samples(str(digits_shards / "test" / "test-000000.tar")))
    sample = decode_sample(raw, channels=1)
    index = int(sample["key"].split("-")[1])
    assert np.array_equal(sample["input"][0].numpy(), source.train.read(index)[..., 0])
    assert sample["label"] == source.train.labels[index]


# ----------------------------------------------------------------------------------------------
# write options


def read_split(folder):
    manifest = load_manifest(folder)
    return manifest, [decode_sample(raw, manifest.channels) for s in manifest.shards for raw in raw_samples(manifest.url(s), s)]


def test_parallel_writing_is_byte_identical_to_serial(tmp_path):
    serial = write_dataset(load_source("digits"), tmp_path / "serial", labels_per_class=5, maxcount=64)
    parallel = write_dataset(load_source("digits"), tmp_path / "parallel", labels_per_class=5, maxcount=64, workers=3)
    assert serial == parallel  # every manifest field: shard hashes, histograms, exact mean and std
    for split in ("labeled", "unlabeled", "test"):
        for shard in serial[split]["shards"]:
            assert (tmp_path / "serial" / split / shard["url"]).read_bytes() == (tmp_path / "parallel" / split / shard["url"]).read_bytes()


def test_mean_and_std_are_exact_over_the_training_splits(tmp_path):
    source = load_source("digits")
    manifests = write_dataset(source, tmp_path / "d", labels_per_class=5)
    training = [i for split in ("labeled", "unlabeled") for i in (int(k.split("-")[1]) for k in
                (s["key"] for s in read_split(tmp_path / "d" / split)[1]))]
    pixels = np.stack([source.train.read(i) for i in training]).astype(np.float64) / 255
    assert np.allclose(manifests["test"]["mean"], [pixels.mean()]) and np.allclose(manifests["test"]["std"], [pixels.std()])


@pytest.mark.parametrize("encoding, exact", [("png", True), ("raw", True), ("jpg", False)])
def test_encodings(tmp_path, encoding, exact):
    source = load_source("digits")
    manifests = write_dataset(source, tmp_path / "d", labels_per_class=5, encoding=encoding, quality=90)
    assert manifests["labeled"]["input"]["encoding"] == encoding and manifests["labeled"]["input"].get("quality") == (90 if encoding == "jpg" else None)
    manifest, samples = read_split(tmp_path / "d" / "test")
    ext = {"png": ".png", "raw": ".npy", "jpg": ".jpg"}[encoding]
    assert all(n.endswith((ext, ".cls")) for n in members(tmp_path / "d" / "test" / manifest.shards[0].url))
    errors = [np.abs(s["input"][0].numpy().astype(int) - source.train.read(int(s["key"].split("-")[1]))[..., 0]).max() for s in samples]
    assert max(errors) == 0 if exact else 0 < max(errors) < 64


def test_maxsize_and_maxcount_bound_each_shard(tmp_path):
    manifests = write_dataset(load_source("digits"), tmp_path / "d", labels_per_class=5, maxcount=150, maxsize=40_000)
    shards = manifests["unlabeled"]["shards"]
    assert len(shards) > 1208 // 150 and all(s["num_samples"] <= 150 for s in shards)
    assert all(s["bytes"] <= 40_000 + 10240 for s in shards)  # plus the padding of the last 10 KiB tar record


# ----------------------------------------------------------------------------------------------
# verify


def problems_of(folder, workers=1):
    return {r.name: r.problems for r in verify(folder, workers) if r.problems}


def test_verify_passes_a_good_dataset_with_workers(digits_shards):
    reports = verify(digits_shards, workers=2)
    assert len(reports) == 20 and not any(r.problems for r in reports)
    assert sum(r.samples for r in reports) == 1797


def test_verify_catches_a_flipped_byte_a_truncated_tar_and_a_wrong_count(digits_shards, tmp_path):
    shards = shutil.copytree(digits_shards, tmp_path / "d")
    flipped = shards / "unlabeled" / "unlabeled-000004.tar"
    data = bytearray(flipped.read_bytes())
    with tarfile.open(flipped) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".png")][10]  # the image no longer decodes, the hash differs
    data[member.offset_data + 20] ^= 0xFF
    flipped.write_bytes(data)
    truncated = shards / "test" / "test-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:30000])
    manifest = json.loads((shards / "labeled" / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] = 51
    (shards / "labeled" / "manifest.json").write_text(json.dumps(manifest))

    found = problems_of(shards)
    assert set(found) == {"unlabeled/unlabeled-000004.tar", "test/test-000001.tar", "labeled/labeled-000000.tar", "labeled/manifest.json"}
    assert found["unlabeled/unlabeled-000004.tar"][0].startswith("sha256 ") and "1 sample(s) do not decode" in found["unlabeled/unlabeled-000004.tar"][1]
    assert found["test/test-000001.tar"][0].startswith("30000 bytes, the manifest says")
    assert found["test/test-000001.tar"][1] == "14 samples, the manifest says 100"
    assert found["test/test-000001.tar"][2].startswith("is truncated or corrupt after 14 samples (unexpected end of data")
    assert found["labeled/labeled-000000.tar"] == ["50 samples, the manifest says 51"]
    assert found["labeled/manifest.json"] == ["the shards hold 51 samples in all, the manifest says 50"]


def test_verify_catches_labels_out_of_range_missing_and_unlisted_shards(digits_shards, tmp_path):
    from tests.data.conftest import rewrite_shard

    shards = shutil.copytree(digits_shards, tmp_path / "d")
    rewrite_shard(shards / "test", 2, lambda samples: [dict(s, cls=b"10") if i == 7 else s for i, s in enumerate(samples)])
    (shards / "test" / "test-000004.tar").rename(shards / "test" / "stray.tar")
    found = problems_of(shards / "test")
    assert found["test/test-000002.tar"] == [f"sample {'?'} has label 10, outside 0..9".replace("?", found["test/test-000002.tar"][0].split()[1])]
    assert found["test/test-000004.tar"] == [f"shard {shards / 'test' / 'test-000004.tar'} is missing".removeprefix(f"shard {shards / 'test' / 'test-000004.tar'} ")]
    assert found["test/manifest.json"] == ["stray.tar is not listed in the manifest"]


def test_verify_command_reports_shard_by_shard(digits_shards, tmp_path):
    from tests.conftest import run_cli

    shards = shutil.copytree(digits_shards, tmp_path / "d")
    (shards / "test" / "test-000003.tar").write_bytes(b"")
    bad = run_cli("shards", "verify", str(shards), "--workers", "2")
    assert bad.returncode == 2 and "test/test-000003.tar: 0 bytes, the manifest says" in bad.stdout
    assert bad.stdout.count(": ok (") == 19 and bad.stdout.splitlines()[0] == "labeled/labeled-000000.tar: ok (50 samples)"
    assert bad.stderr.strip() == f"dist-ssl: error: 1 of 20 checked files in {shards} have problems (listed above)"


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_reads_what_tarfile_reads(tmp_path, tar_format):
    """Our header reader (tarfile is 10x slower on small images) against tarfile, on other writers' tars:
    long names (ustar prefix, GNU 'L', PAX 'path'), a float mtime (PAX), directories, a link, metadata."""
    import io

    from dist_ssl.data.shards.tar import tar_members

    deep = "a" * 60 + "/" + "b" * 60 + "/sample.0001"
    files = {"x/k1.png": b"\x89PNG" * 100, "x/k1.cls": b"3", f"{deep}.png": b"p" * 513, f"{deep}.cls": b"7",
             "__meta__": b"{}", "k2.npy": b"n" * 512, "k2.cls": b""}
    if tar_format == tarfile.GNU_FORMAT:
        files["c" * 150 + ".png"] = b"gnu long name"
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        directory = tarfile.TarInfo("x")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5 if tar_format == tarfile.PAX_FORMAT else 0
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("x/link")
        link.type, link.linkname = tarfile.SYMTYPE, "k1.png"
        tar.addfile(link)
    with open(path, "rb") as handle:
        got = {m["fname"]: m["data"] for m in tar_members(handle, str(path))}
    assert got == {name: data for name, data in files.items() if name != "__meta__"}


def test_tar_members_rejects_a_damaged_header():
    import io

    from dist_ssl.data.shards.tar import tar_members

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("k.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    data = bytearray(buffer.getvalue())
    data[10] ^= 0x01  # inside the name: the checksum no longer matches
    with pytest.raises(ValueError, match="bad tar header checksum"):
        list(tar_members(io.BytesIO(bytes(data)), "t.tar"))


# ----------------------------------------------------------------------------------------------
# shard URLs a dataset folder from someone else may hold


def planted(digits_shards, tmp_path, url_of):
    """A copy of the dataset whose labeled manifest names its one shard by another URL."""
    data = tmp_path / "data"
    shutil.copytree(digits_shards, data)
    path = data / "labeled" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["url"] = url_of(data / "labeled" / manifest["shards"][0]["url"])
    path.write_text(json.dumps(manifest))
    return data


def test_a_pipe_url_in_a_manifest_never_runs_unless_allowed(digits_shards, tmp_path):
    marker = tmp_path / "MARKER"
    data = planted(digits_shards, tmp_path, lambda tar: f"pipe:touch {marker}; cat {tar}")
    refused = "runs a shell command (pipe:); refused, as a dataset folder may come from anyone"
    for args in (["shards", "verify", str(data)],
                 ["train", "configs/digits/supervised.yaml", f"data.shards={data}", f"train.output_dir={tmp_path / 'run'}"]):
        done = run_cli(*args)
        assert done.returncode == 2 and refused in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not marker.exists(), args
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    allowed = run_cli("shards", "verify", str(data / "labeled"), "--allow-pipe")
    assert f"labeled/pipe:touch {marker}; cat {data / 'labeled'}/labeled-000000.tar: ok (50 samples)" in allowed.stdout, allowed.stdout
    assert marker.exists()  # the user's explicit choice: it ran


@pytest.mark.parametrize("url_of, why", [
    (lambda tar: str(tar), "is an absolute path, outside the split folder"),
    (lambda tar: f"../labeled/{tar.name}", "leads outside the split folder (..)"),
    (lambda tar: f"s3://bucket/{tar.name}", "has the scheme s3:, which webdataset opens through a command"),
])
def test_shard_urls_outside_the_split_folder_are_refused_unless_allowed(digits_shards, tmp_path, url_of, why):
    data = planted(digits_shards, tmp_path, url_of)
    with pytest.raises(UserError, match=re.escape(why)):
        load_manifest(data / "labeled")
    allowed = load_manifest(data / "labeled", allow_pipe=True)
    if "s3" not in why:
        shard = allowed.shards[0]
        assert sum(1 for _ in raw_samples(allowed.url(shard), shard)) == 50


# ----------------------------------------------------------------------------------------------
# transient storage faults: retried with backoff, then one clear error


def test_a_shard_missing_for_a_moment_is_read_after_a_retry(digits_shards, tmp_path, capfd):
    """A lagging NFS listing or object-store mount: the file comes back while the reader backs off."""
    import threading

    folder = tmp_path / "unlabeled"
    shutil.copytree(digits_shards / "unlabeled", folder)
    manifest = load_manifest(folder)
    path = folder / manifest.shards[0].url
    whole = list(raw_samples(str(path), manifest.shards[0]))
    path.rename(path.with_suffix(".away"))
    threading.Timer(0.4, lambda: path.with_suffix(".away").rename(path)).start()
    reader = ShardReader(str(path), manifest.shards[0])
    assert [s["__key__"] for s in reader] == [s["__key__"] for s in whole]
    assert 1 <= reader.retries <= 2 and reader.problems() == []
    assert f"dist-ssl: warning: shard {path}: it is missing; retry 1 of {RETRIES} in 0.25 s" in capfd.readouterr().err


def test_an_io_error_mid_shard_rereads_it_skipping_what_was_handed_out_then_gives_up(digits_shards, monkeypatch):
    """EIO half-way through a shard (a storage hiccup: the one fault here that is simulated, by a
    stream that fails after N bytes): the reader re-opens it and hands out each sample once; when
    the error persists past RETRIES it is one DataError naming the shard."""
    import importlib

    from dist_ssl.data.shards import tar
    from dist_ssl.data.shards.manifest import DataError

    manifest = load_manifest(digits_shards / "unlabeled")
    info = manifest.shards[0]
    url = manifest.url(info)
    whole = [s["__key__"] for s in raw_samples(url, info)]
    gopen_module = importlib.import_module("webdataset.gopen")  # `webdataset.gopen` is also a function's name
    real_open = gopen_module.gopen
    failures = {"left": 2}

    class Failing:
        def __init__(self, stream, after):
            self.stream, self.left = stream, after

        def read(self, size=-1):
            if self.left <= 0:
                raise OSError(errno.EIO, "Input/output error")
            data = self.stream.read(size if size >= 0 else self.left)[: self.left]
            self.left -= len(data)
            return data

        def close(self):
            self.stream.close()

    def flaky_open(path, mode="rb", **kw):
        stream = real_open(path, mode, **kw)
        if failures["left"] > 0:
            failures["left"] -= 1
            return Failing(stream, info.bytes // 2)
        return stream

    monkeypatch.setattr(gopen_module, "gopen", flaky_open)
    monkeypatch.setattr(tar, "BACKOFF_SECONDS", 0.01)
    reader = ShardReader(url, info)
    assert [s["__key__"] for s in reader] == whole and reader.retries == 2 and reader.problems() == []

    failures["left"] = RETRIES + 1
    with pytest.raises(DataError, match=rf"shard {re.escape(url)} could not be read after {RETRIES} retries: EIO"):
        list(ShardReader(url, info))


def test_retries_during_training_are_counted_in_results_and_change_nothing(digits_shards, tmp_path, monkeypatch):
    """A storage hiccup on a shard the training stream's DataLoader worker reads (another process):
    the run's results.json counts the retries and is otherwise the fault-free run's."""
    import importlib

    from dist_ssl.data.shards import tar
    from dist_ssl.engine.loop import train
    from tests.conftest import tiny_config

    unlabeled = load_manifest(digits_shards / "unlabeled")
    flaky = unlabeled.url(unlabeled.shards[0])
    gopen_module = importlib.import_module("webdataset.gopen")
    real_open = gopen_module.gopen
    tokens = tmp_path / "failures"
    tokens.mkdir()
    for n in range(2):
        (tokens / str(n)).touch()

    def flaky_open(path, mode="rb", **kw):
        # failures shared by every process: a token file taken (removed) per failure
        for token in sorted(tokens.iterdir()) if path == flaky else ():
            try:
                token.unlink()
            except FileNotFoundError:
                continue
            (tmp_path / f"failed-in-{os.getpid()}").touch()
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, mode, **kw)

    config = ("data.workers=1",)
    plain = train(tiny_config(digits_shards, tmp_path / "plain", "fixmatch", *config))
    monkeypatch.setattr(gopen_module, "gopen", flaky_open)  # the workers fork from here: they inherit it
    monkeypatch.setattr(tar, "BACKOFF_SECONDS", 0.01)
    hiccup = train(tiny_config(digits_shards, tmp_path / "hiccup", "fixmatch", *config))
    assert not any(tokens.iterdir())
    failed_in = {p.name for p in tmp_path.glob("failed-in-*")}
    assert failed_in and f"failed-in-{os.getpid()}" not in failed_in  # in a worker process
    assert plain["storage_retries"] == 0 and hiccup["storage_retries"] == 2
    differs = {k for k in plain if plain[k] != hiccup[k]}
    assert differs <= {"storage_retries", "run_dir", "wall_seconds", "train_samples_per_second", "data_wait_fraction"}, differs
    assert json.loads((tmp_path / "hiccup" / "results.json").read_text())["storage_retries"] == 2
