import http.server
import json
import math
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter, defaultdict
from functools import partial
from itertools import islice

import pytest
import torch

from dist_ssl.config import AugmentConfig
from dist_ssl.data.shards.manifest import DataError, load_manifest
from dist_ssl.data.loading import loader
from dist_ssl.data.streams import EvalStream, TrainStream, share, unit_samples
from dist_ssl.data.transforms import build_views
from dist_ssl.errors import UserError
from tests.conftest import REPO
from tests.data.conftest import corrupt_png, repack, rewrite_shard


def views_for(manifest, names=("weak", "strong")):
    views = build_views(manifest.kind, manifest.input_shape, manifest.data["mean"], manifest.data["std"], AugmentConfig())
    return {n: views[n] for n in names}


def stream(manifest, rank=0, world=1, workers=0, batch=8, state=None, seed=7, names=("weak", "strong"), **kwargs):
    return TrainStream(manifest, batch, views_for(manifest, names), rank, world, workers, seed, shuffle_buffer=64, state=state, **kwargs)


def take(stream_, batches, n):
    out = []
    for batch in islice(batches, n):
        stream_.observe(batch)
        out.append(batch)
    return out


def same(a, b):
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    for x, y in zip(a, b):
        for view in x["inputs"]:
            assert torch.equal(x["inputs"][view], y["inputs"][view])
        assert torch.equal(x["truth"], y["truth"])


def epoch_keys(batches):
    return [(e, k) for b in batches for e, k in zip(b["epoch"].tolist(), b["keys"])]


def assert_each_epoch_exactly_once(records, manifest, complete_epochs):
    by_epoch = defaultdict(Counter)
    for epoch, key in records:
        by_epoch[epoch][key] += 1
    for epoch, keys in by_epoch.items():
        assert max(keys.values()) == 1, f"epoch {epoch} repeats {[k for k, n in keys.items() if n > 1][:5]}"
    for epoch in range(complete_epochs):
        assert len(by_epoch[epoch]) == manifest.num_samples, f"epoch {epoch} misses {manifest.num_samples - len(by_epoch[epoch])} samples"


@pytest.fixture
def shards(digits_shards, tmp_path):
    """A copy of the digits shards that a test may damage."""
    return shutil.copytree(digits_shards, tmp_path / "digits")


@pytest.mark.parametrize("split, virtual", [("unlabeled", 64), ("labeled", 64), ("unlabeled", 12), ("test", 6)])
def test_a_data_epoch_reads_every_sample_exactly_once(digits_shards, split, virtual):
    manifest = load_manifest(digits_shards / split)
    s = stream(manifest, virtual_consumers=virtual)
    seen = Counter()
    for consumer in range(virtual):
        for work in s.plan(consumer, epoch=0):
            seen.update(raw["__key__"] for _, raw in unit_samples(manifest, work.unit, s.seed, 0, work.buffer))
    assert sum(seen.values()) == manifest.num_samples and max(seen.values()) == 1


def test_epochs_reshuffle(digits_shards):
    manifest = load_manifest(digits_shards / "unlabeled")
    s = stream(manifest, virtual_consumers=1)
    first = [raw["__key__"] for w in s.plan(0, 0) for _, raw in unit_samples(manifest, w.unit, s.seed, 0, 64)]
    second = [raw["__key__"] for w in s.plan(0, 1) for _, raw in unit_samples(manifest, w.unit, s.seed, 1, 64)]
    assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("world", [1, 2])
def test_each_sample_carries_its_index_in_the_split_whatever_rank_reads_it(digits_shards, world):
    """FlexMatch keeps per-sample state by `index`: the sample's place in the manifest's shard order
    and in its shard's file, the same in every epoch and layout."""
    from dist_ssl.data.shards.tar import raw_samples

    manifest = load_manifest(digits_shards / "unlabeled")
    in_file_order = [raw["__key__"] for shard in manifest.shards for raw in raw_samples(manifest.url(shard), shard)]
    seen = Counter()
    for rank in range(world):
        s = stream(manifest, rank, world, batch=17, names=("weak",))
        # three data epochs' worth: virtual consumers with more data than others finish epoch 0 later
        for batch in take(s, iter(s), -(-3 * manifest.num_samples // (17 * world))):
            assert [in_file_order[i] for i in batch["index"].tolist()] == batch["keys"]
            seen.update(batch["index"][batch["epoch"] == 0].tolist())
    assert sorted(seen) == list(range(manifest.num_samples)) and max(seen.values()) == 1


def test_resume_continues_with_exactly_the_same_batches(digits_shards):
    manifest = load_manifest(digits_shards / "unlabeled")
    reference = stream(manifest, batch=50)
    batches = iter(reference)
    take(reference, batches, 30)  # 1,500 samples: crosses a data epoch (1,207 samples)
    state = reference.state_dict()
    expected = take(reference, batches, 6)
    resumed = stream(manifest, batch=50, state=state)
    same(take(resumed, iter(resumed), 6), expected)


def test_resume_with_dataloader_worker_processes(digits_shards):
    manifest = load_manifest(digits_shards / "unlabeled")
    reference = stream(manifest, workers=2, batch=16)
    batches = iter(loader(reference, 2))
    take(reference, batches, 7)  # odd: the resumed loader must start with the other worker
    state = reference.state_dict()
    expected = take(reference, batches, 5)
    resumed = stream(manifest, workers=2, batch=16, state=state)
    same(take(resumed, iter(loader(resumed, 2)), 5), expected)


def test_augmentation_does_not_depend_on_workers(digits_shards):
    manifest = load_manifest(digits_shards / "labeled")
    by_key, seen = {}, {}
    for workers in (0, 2):
        s = stream(manifest, workers=workers, batch=6)
        seen[workers] = []
        for batch in islice(loader(s, workers), 20):  # 120 samples: past the labeled split's 50
            for i, (epoch, key) in enumerate(zip(batch["epoch"].tolist(), batch["keys"])):
                strong = batch["inputs"]["strong"][i]
                if (epoch, key) in by_key:
                    assert torch.equal(by_key[epoch, key], strong), key
                by_key[epoch, key] = strong
                seen[workers].append((epoch, key))
    assert seen[0] == seen[2] and len({key for _, key in seen[0]}) == 50


def test_views_are_random_per_sample(digits_shards):
    manifest = load_manifest(digits_shards / "labeled")
    s = stream(manifest, batch=50)
    batch = next(iter(s))
    again = next(iter(stream(manifest, batch=50, seed=8)))  # another seed: other order, other augmentation
    index = {k: i for i, k in enumerate(again["keys"])}
    both = [(i, index[k]) for i, k in enumerate(batch["keys"]) if k in index]
    differs = sum(not torch.equal(batch["inputs"]["strong"][i], again["inputs"]["strong"][j]) for i, j in both)
    assert len(both) > 20 and differs > 0.8 * len(both)
    assert batch["inputs"]["weak"].dtype == torch.float32 and batch["inputs"]["weak"].shape == (50, 1, 8, 8)


def run_ranks(manifest, world, workers, batch, steps, states=None, virtual=12, names=("plain",)):
    """`world` ranks in lockstep (as under DDP), each consuming `steps` batches; returns records and states."""
    records, streams = [], []
    for rank in range(world):
        s = stream(manifest, rank, world, workers, batch=batch, state=states, names=names, virtual_consumers=virtual)
        records += epoch_keys(take(s, iter(loader(s, workers)), steps))
        streams.append(s)
    return records, [s.state_dict() for s in streams]


def global_batches(manifest, layout, steps, states=None, virtual=12):
    """Per global batch, its keys and strong views (the batched path: its pieces' plans merged), and
    the ranks' states after `steps` batches."""
    from dist_ssl.data import device_views

    world, workers = layout
    views = device_views.build_batched_views(manifest.kind, manifest.input_shape, manifest.data["mean"], manifest.data["std"], AugmentConfig())
    streams = [TrainStream(manifest, 24 // world, {"strong": views["strong"]}, rank, world, workers, 7, 64, state=states,
                           virtual_consumers=virtual) for rank in range(world)]
    loaders = [iter(loader(s, workers)) for s in streams]
    batches = []
    for _ in range(steps):
        shares = [s.observe(next(batches_)) for s, batches_ in zip(streams, loaders)]
        strong = torch.cat([device_views.on_device(b, views, torch.device("cpu"))["strong"] for b in shares])
        batches.append(([k for b in shares for k in b["keys"]], strong))
    return batches, [s.state_dict() for s in streams]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for step, ((keys_a, views_a), (keys_b, views_b)) in enumerate(zip(a, b)):
        assert keys_a == keys_b, f"global batch {step}"
        assert torch.equal(views_a, views_b), f"global batch {step}"


def test_global_batches_and_their_views_do_not_depend_on_ranks_or_workers(digits_shards):
    """The batches of 1, 2 and 4 ranks with 0, 1 or 2 workers, joined in rank order: the same
    samples in the same order, with the same strong views, batch after batch (past a data epoch)."""
    manifest = load_manifest(digits_shards / "unlabeled")
    reference, _ = global_batches(manifest, (1, 0), 60)
    for layout in [(2, 2), (4, 0), (3, 1)]:
        assert_same_batches(global_batches(manifest, layout, 60)[0], reference)


def test_resuming_on_another_layout_continues_the_same_global_batches(digits_shards):
    manifest = load_manifest(digits_shards / "unlabeled")
    reference, _ = global_batches(manifest, (1, 0), 70)
    first, states = global_batches(manifest, (4, 0), 25)
    second, states = global_batches(manifest, (2, 2), 30, states)
    third, _ = global_batches(manifest, (3, 0), 15, states)
    assert_same_batches(first + second + third, reference)


def test_the_batch_shares_of_the_virtual_consumers():
    """Every rank of every world size that divides gcd(V, B) gets B/W samples of every batch, and
    every virtual consumer gives the same number of samples over a round."""
    for virtual, batch in [(64, 20), (64, 448), (12, 30), (64, 6), (6, 64)]:
        blocks = math.gcd(virtual, batch)
        for number in range(virtual):
            counts = [share(c, number, virtual, batch) for c in range(virtual)]
            for world in (w for w in range(1, blocks + 1) if blocks % w == 0):
                assert {sum(counts[r * virtual // world : (r + 1) * virtual // world]) for r in range(world)} == {batch // world}
        rounds = [sum(share(c, k, virtual, batch) for k in range(virtual)) for c in range(virtual)]
        assert set(rounds) == {batch}


def test_a_layout_that_cannot_share_the_virtual_consumers_is_one_clear_error(digits_shards):
    manifest = load_manifest(digits_shards / "labeled")
    with pytest.raises(UserError, match=r"3 processes cannot share the stream of .*labeled: its global batches of 24 are cut from "
                                        r"data.virtual_consumers=64 virtual consumers, which 1, 2, 4, 8 processes can share evenly"):
        stream(manifest, world=3, batch=8)
    with pytest.raises(UserError, match="data.workers=17 is more than the 16 virtual consumers each of the 4 processes serves"):
        stream(manifest, world=4, workers=17, batch=8)


def test_another_number_of_virtual_consumers_deals_what_was_left_and_says_so(digits_shards):
    """A checkpoint of another data.virtual_consumers (or from before them) continues every epoch
    exactly once, with a notice that the order changes from there on."""
    manifest = load_manifest(digits_shards / "unlabeled")
    first, states = run_ranks(manifest, 2, 0, 10, 25, virtual=64)
    resumed = stream(manifest, 0, 3, 0, batch=10, state=states, names=("plain",), virtual_consumers=12)
    assert "saved with 64 virtual consumers, this run has data.virtual_consumers=12" in resumed.notice
    second, _ = run_ranks(manifest, 3, 0, 10, 120, states=states, virtual=12)
    assert_each_epoch_exactly_once(first + second, manifest, complete_epochs=2)
    legacy = [dict({k: v for k, v in state.items() if k != "virtual_consumers"}, world=2, workers=32) for state in states]
    assert "saved with 64 consumers (before virtual consumers)" in stream(manifest, 0, 1, 0, batch=30, state=legacy).notice


@pytest.mark.parametrize("uneven, before, after, complete", [
    (False, (2, 2, 10, 25), (3, 0, 10, 150), 2),  # (world, workers, batch per rank, steps)
    (True, (3, 0, 30, 30), (2, 2, 10, 300), 4),  # shards of 1..601 samples: readers are epochs apart when it stops
])
def test_resuming_on_another_layout_continues_every_epoch_exactly_once(digits_shards, tmp_path, uneven, before, after, complete):
    split = digits_shards / "unlabeled"
    if uneven:
        split = shutil.copytree(split, tmp_path / "unlabeled")
        repack(split, [1, 2, 600, 3, 601])
    manifest = load_manifest(split)
    first, states = run_ranks(manifest, *before)
    if uneven:
        assert len({phase for s in states for phase, _, _ in s["positions"].values()}) >= 2
    second, _ = run_ranks(manifest, *after, states=states)
    assert_each_epoch_exactly_once(first + second, manifest, complete_epochs=complete)


def test_one_ranks_state_cannot_resume_another_layout(digits_shards):
    manifest = load_manifest(digits_shards / "unlabeled")
    state = stream(manifest, rank=0, world=2).state_dict()
    with pytest.raises(UserError, match="from one rank's state: it was read by 2 ranks x 1 workers, this run has 1 x 1"):
        stream(manifest, world=1, state=state)
    with pytest.raises(UserError, match="needs the states of all 2 ranks that saved it, 1 given"):
        stream(manifest, world=1, state=[state])


@pytest.mark.parametrize("split, world, workers", [("test", 1, 0), ("test", 2, 2), ("test", 3, 1), ("labeled", 3, 2), ("test", 7, 0)])
def test_eval_stream_is_exactly_once(digits_shards, split, world, workers):
    manifest = load_manifest(digits_shards / split)
    view = build_views(manifest.kind, manifest.input_shape, manifest.data["mean"], manifest.data["std"], AugmentConfig())["plain"]
    seen = Counter()
    for rank in range(world):
        s = EvalStream(manifest, 32, view, rank, world)
        for batch in loader(s, min(workers, len(s.my_units()))):
            seen.update(batch["keys"])
    assert sum(seen.values()) == manifest.num_samples and max(seen.values()) == 1


# ----------------------------------------------------------------------------------------------
# kill and resume


STREAM_SCRIPT = """
import json, os, sys
from dist_ssl.data.shards.manifest import load_manifest
from dist_ssl.data.loading import loader
from dist_ssl.data.streams import TrainStream
from tests.data.test_streams import views_for

split, state_path, log_path, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
manifest = load_manifest(split)
state = json.load(open(state_path)) if os.path.exists(state_path) else None
stream = TrainStream(manifest, 16, views_for(manifest, ("plain",)), 0, 1, 2, 7, 64, state=state)
batches = iter(loader(stream, 2))
while stream.batches < total:
    batch = stream.observe(next(batches))
    with open(log_path, "a") as log:
        log.write(json.dumps([batch["epoch"].tolist(), batch["keys"]]) + "\\n")
    with open(state_path + ".tmp", "w") as handle:
        json.dump(stream.state_dict(), handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(state_path + ".tmp", state_path)
"""


def run_stream(split, state, log, total, **popen):
    command = [sys.executable, "-c", STREAM_SCRIPT, str(split), str(state), str(log), str(total)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def read_log(log, batches=None):
    lines = log.read_text().splitlines()[:batches]
    return [(e, k) for line in lines for e, k in zip(*json.loads(line))]


@pytest.mark.slow
def test_a_killed_stream_resumes_with_no_sample_missing_or_repeated(digits_shards, tmp_path):
    from tests.conftest import kill_tree

    split, total = digits_shards / "unlabeled", 160  # 2,560 samples: two data epochs and a bit
    reference = run_stream(split, tmp_path / "ref.json", tmp_path / "ref.log", total)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    victim = run_stream(split, tmp_path / "state.json", tmp_path / "run.log", total)
    deadline = time.time() + 300
    # batch N is logged before its state is saved, so 51 logged lines mean at least 50 saved
    while time.time() < deadline and (not (tmp_path / "run.log").exists() or len((tmp_path / "run.log").read_text().splitlines()) < 51):
        assert victim.poll() is None, victim.stdout.read()  # it must still be running: a crash fails here, with its output
        time.sleep(0.02)
    kill_tree(victim.pid)  # SIGKILL, DataLoader workers included, mid-epoch
    victim.wait()
    saved = json.loads((tmp_path / "state.json").read_text())["batches"]
    assert 50 <= saved < total
    lines = (tmp_path / "run.log").read_text().splitlines()[:saved]  # a batch logged but not yet saved is read again
    (tmp_path / "run.log").write_text("".join(line + "\n" for line in lines))
    resumed = run_stream(split, tmp_path / "state.json", tmp_path / "run.log", total)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()

    assert read_log(tmp_path / "run.log") == read_log(tmp_path / "ref.log")
    assert_each_epoch_exactly_once(read_log(tmp_path / "run.log"), load_manifest(split), complete_epochs=2)


# ----------------------------------------------------------------------------------------------
# bad data


def test_a_corrupt_sample_is_skipped_counted_and_the_batch_still_full(shards, capfd):
    rewrite_shard(shards / "unlabeled", 2, lambda samples: [corrupt_png(s) if i == 5 else s for i, s in enumerate(samples)])
    manifest = load_manifest(shards / "unlabeled")
    s = stream(manifest, batch=50, max_bad_fraction=0.01)
    batches = take(s, iter(s), 75)  # 3,750 samples: data epoch 0 complete on every virtual consumer
    assert all(len(b["keys"]) == 50 for b in batches)
    assert s.corrupt_samples == s.samples_read - 3750 >= 1  # once per data epoch that reached it
    assert_each_epoch_exactly_once(epoch_keys(batches), manifest, complete_epochs=0)
    assert len({k for e, k in epoch_keys(batches) if e == 0}) == manifest.num_samples - 1
    assert "dist-ssl: warning: skipped corrupt sample" in capfd.readouterr().err
    resumed = stream(manifest, batch=50, state=s.state_dict())
    assert resumed.corrupt_samples == s.corrupt_samples >= 3  # counts survive a resume


def test_too_many_corrupt_samples_fail_naming_the_split(shards):
    rewrite_shard(shards / "labeled", 0, lambda samples: [corrupt_png(s) if i % 5 == 0 else s for i, s in enumerate(samples)])
    manifest = load_manifest(shards / "labeled")
    with pytest.raises(DataError, match=r"\d+ of \d+ samples read from .*labeled were corrupt, more than data.max_bad_fraction=0.05 allows"):
        list(islice(stream(manifest, batch=10, max_bad_fraction=0.05), 10))
    with pytest.raises(DataError, match="1 of .* more than data.max_bad_fraction=0.0 allows"):
        list(islice(stream(manifest, batch=10, max_bad_fraction=0.0), 10))


def test_an_error_in_a_dataloader_worker_is_one_line_naming_the_shard(shards):
    rewrite_shard(shards / "labeled", 0, lambda samples: [dict(s, cls=b"12") if i == 3 else s for i, s in enumerate(samples)])
    manifest = load_manifest(shards / "labeled")
    s = stream(manifest, workers=2, batch=5)
    with pytest.raises(DataError) as caught:
        take(s, iter(loader(s, 2)), 20)
    message = str(caught.value)
    assert "\n" not in message and caught.value.rank_local
    assert message.startswith(f"shard {shards / 'labeled' / 'labeled-000000.tar'}: sample ") and "has label 12, outside 0..9" in message


@pytest.mark.parametrize("damage, message", [
    ("flip", r"does not match its manifest: sha256 \w+\.\.\., the manifest says"),
    ("truncate", r"is truncated or corrupt after \d+ samples"),
    ("count", "does not match its manifest: 100 samples, the manifest says 99"),
    ("missing", r"shard .*test-000003.tar is missing"),
])
def test_a_damaged_shard_is_one_clear_error_naming_it(shards, damage, message):
    path = shards / "test" / "test-000003.tar"
    data = bytearray(path.read_bytes())
    manifest_path = shards / "test" / "manifest.json"
    with tarfile.open(path) as tar:
        member = tar.getmembers()[101]
    if damage == "flip":  # in the zero padding after a member: the tar still parses and every sample decodes
        data[member.offset_data + member.size + 1] ^= 0xFF
        path.write_bytes(data)
    elif damage == "truncate":  # inside a member's data
        path.write_bytes(data[: member.offset_data + member.size // 2])
    elif damage == "count":
        manifest = json.loads(manifest_path.read_text())
        manifest["shards"][3]["num_samples"] = 99
        manifest["num_samples"] -= 1
        manifest_path.write_text(json.dumps(manifest))
    else:
        path.unlink()
    manifest = load_manifest(shards / "test")
    view = views_for(manifest, ("plain",))["plain"]
    with pytest.raises(UserError, match=message) as caught:
        for _ in loader(EvalStream(manifest, 32, view, 0, 1), 2):
            pass
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------
# URLs


@pytest.fixture
def http_server(digits_shards):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(digits_shards))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def remote_split(digits_shards, tmp_path, split, url_of):
    """A split folder holding only a manifest whose shard URLs point elsewhere."""
    manifest = json.loads((digits_shards / split / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["url"] = url_of(split, shard["url"])
    (tmp_path / split).mkdir()
    (tmp_path / split / "manifest.json").write_text(json.dumps(manifest))
    return load_manifest(tmp_path / split, allow_pipe=True)  # pipe: URLs and paths elsewhere: this test's own choice


@pytest.mark.parametrize("scheme", ["http", "pipe"])
def test_shards_stream_from_http_and_pipe_urls(digits_shards, tmp_path, http_server, scheme):
    url_of = {"http": lambda split, name: f"{http_server}/{split}/{name}",
              "pipe": lambda split, name: f"pipe:cat {digits_shards / split / name}"}[scheme]
    local = load_manifest(digits_shards / "unlabeled")
    remote = remote_split(digits_shards, tmp_path, "unlabeled", url_of)
    a, b = stream(local, workers=2, batch=17), stream(remote, workers=2, batch=17)
    same(take(b, iter(loader(b, 2)), 80), take(a, iter(loader(a, 2)), 80))  # 1,360 samples: past a data epoch
    test = remote_split(digits_shards, tmp_path, "test", url_of)
    view = views_for(test, ("plain",))["plain"]
    assert sum(len(batch["keys"]) for batch in loader(EvalStream(test, 64, view, 0, 1), 2)) == test.num_samples


@pytest.mark.parametrize("scheme", ["http", "pipe"])
def test_an_unreachable_url_names_the_shard_and_the_exit_status(digits_shards, tmp_path, http_server, scheme):
    url = {"http": f"{http_server}/test/no-such-shard.tar", "pipe": f"pipe:cat {tmp_path / 'no-such-shard.tar'}"}[scheme]
    test = remote_split(digits_shards, tmp_path, "test", lambda split, name: url if name.endswith("02.tar") else f"{http_server}/{split}/{name}")
    view = views_for(test, ("plain",))["plain"]
    status = {"http": 22, "pipe": 1}[scheme]  # curl -f on a 404; cat on a missing file
    with pytest.raises(DataError, match=f"shard {url} could not be read: its reader exited with status {status}"):
        for _ in loader(EvalStream(test, 64, view, 0, 1), 0):
            pass
