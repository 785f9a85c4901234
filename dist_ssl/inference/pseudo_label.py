"""Sharded pseudo-labeling: a checkpoint predicts every sample of a pool exactly once, on one
process or under `accelerate launch` with N, and an interrupted run resumes by shard.

Why not DistributedSampler or accelerate's `even_batches` + gather: both pad by duplicating
samples so that every rank gets as many batches, and a gathered stream of unknown length cannot be
trimmed back. Here the unit of work is an input shard, whose length the manifest knows:

* Output file i (`predictions-00000i.npz`) holds the predictions of pool shard i, in the shard's
  order. One rank writes it (tmp name, fsync, rename); a finished file is never recomputed, so a
  run resumes by shard with any number of processes (see `jobs`).
* Ranks take contiguous blocks of the shards still to do, balanced by sample count, and run
  batched inference in eval mode, without autograd, in bf16/fp16 autocast on GPUs. No collective
  runs while they work, so a rank with no shard just waits at the final barrier.
* At the end rank 0 checks that the output keys are exactly the manifest's (every shard present
  with its manifest count, nothing from another shard, no key twice) before it publishes
  `manifest.json` with the pool's statistics; otherwise every rank fails with one clear error.

Shards are read as training reads them (`data.shards`): bytes, sha256 and sample count are checked
against the manifest in the same pass, and a sample that does not decode is skipped, its key kept
in the file's `skipped` list, until more than `max_bad_fraction` of what a reader read was corrupt.

What a file stores, per sample in shard order: its key, its position in the shard, the top-P
classes (int32) and their probabilities (float32), most probable first, and the hidden truth (-1
when unknown), as plain arrays in one .npz (read with allow_pickle=False), plus the keys of skipped
corrupt samples and the shard's label statistics. No image
bytes: at billion scale the predictions are ~100 bytes per image against kilobytes for the image,
and a selection keeps a few percent of the pool, so `select` re-reads only the pool shards it
needs, in order, by (shard, position).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dist_ssl.config import InferenceConfig
from dist_ssl.data.shards.manifest import (
    DataError,
    Manifest,
    check_local_shards,
    load_manifest,
    sha256_file,
)
from dist_ssl.data.shards.tar import raw_samples
from dist_ssl.data.loading import loader
from dist_ssl.data.streams import SampleChecker
from dist_ssl.engine import preemption
from dist_ssl.engine.lock import run_lock
from dist_ssl.engine.logging import Progress
from dist_ssl.errors import UserError
from dist_ssl.files import atomic_write, atomic_write_json
from dist_ssl.inference.jobs import MANIFEST, claim_folder, contiguous_blocks
from dist_ssl.inference.label_stats import LabelStats

FORMAT = "dist-ssl-pseudo-labels/1"
LINE_EVERY_BATCHES = 100  # a progress line at least this often (and every 30 s: engine.logging.Progress)


def output_name(shard: int) -> str:
    return f"predictions-{shard:06d}.npz"


@dataclass
class ShardPredictions:
    keys: np.ndarray  # bytes (utf-8) [n]
    positions: np.ndarray  # int32 [n]: where each sample sits in its shard (corrupt ones are skipped)
    classes: np.ndarray  # int32 [n, P], most probable first
    probs: np.ndarray  # float32 [n, P]
    truth: np.ndarray  # int32 [n], -1 where unknown
    skipped: np.ndarray  # bytes [m]: keys of the shard's corrupt samples


def read_predictions(path: Path) -> ShardPredictions:
    with np.load(path, allow_pickle=False) as data:
        return ShardPredictions(data["keys"], data["positions"], data["classes"], data["probs"], data["truth"], data["skipped"])


def load_predictions_manifest(folder: str | Path) -> dict:
    """The published manifest of a pseudo-label folder (refused while the job is unfinished)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        what = "an unfinished pseudo-label job (run it again to finish it)" if (folder / "job.json").is_file() else "no pseudo-labels"
        raise UserError(f"{folder} holds {what}: no {MANIFEST}")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise UserError(f"{path} is not a pseudo-label manifest (format {FORMAT!r} expected)")
    return data


def pool_manifest(path: str | Path, allow_pipe: bool = False) -> Manifest:
    """A split folder, or a dataset folder (its `unlabeled/` split)."""
    path = Path(path)
    return load_manifest(path / "unlabeled" if not (path / "manifest.json").is_file() and (path / "unlabeled").is_dir() else path, allow_pipe)


# ----------------------------------------------------------------------------------------------
# reading the pool


class ShardReader(IterableDataset):
    """Decoded samples of whole shards in batches that never span two shards; each shard ends with
    an {'end'} item that lists its corrupt samples. DataLoader workers take every W-th shard. A
    DataError (an altered shard, too many corrupt samples) becomes an {'error'} item, which `loader`
    raises in the main process as the same one-line error."""

    def __init__(self, manifest: Manifest, shards: list[int], batch_size: int, per_sample, max_bad_fraction: float):
        self.manifest, self.shards, self.batch_size, self.per_sample = manifest, shards, batch_size, per_sample
        self.max_bad_fraction = max_bad_fraction

    def __iter__(self):
        info = get_worker_info()
        shards = self.shards[info.id :: info.num_workers] if info is not None else self.shards
        checker = SampleChecker(self.manifest, self.max_bad_fraction)
        try:
            for shard in shards:
                yield from self._shard(shard, checker)
        except DataError as exc:
            if info is None:
                raise
            yield {"error": str(exc)}

    def _shard(self, shard: int, checker: SampleChecker):
        info = self.manifest.shards[shard]
        url = self.manifest.url(info)
        batch: list[tuple[int, dict]] = []
        skipped: list[str] = []
        for position, raw in enumerate(raw_samples(url, info)):  # checked against the manifest as it is read
            sample = checker(raw, url)
            if sample is None:
                skipped.append(raw.get("__key__", "?"))
                continue
            batch.append((position, sample))
            if len(batch) == self.batch_size:
                yield self._collate(shard, batch)
                batch = []
        if batch:
            yield self._collate(shard, batch)
        yield {"shard": shard, "end": True, "skipped": skipped}

    def _collate(self, shard: int, batch: list[tuple[int, dict]]) -> dict:
        return {
            "shard": shard,
            "input": torch.stack([self.per_sample(s["input"]) for _, s in batch]),
            "keys": [s["key"] for _, s in batch],
            "positions": torch.tensor([p for p, _ in batch], dtype=torch.int32),
            "truth": torch.tensor([-1 if s["truth"] is None else s["truth"] for _, s in batch], dtype=torch.int32),
        }


# ----------------------------------------------------------------------------------------------
# inference


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means fp32. `auto`: bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU (where
    bf16 autocast is usually slower than fp32 without AMX units)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@torch.inference_mode()
def _predict(net, pool: Manifest, view, shards: list[int], out: Path, device: torch.device, dtype, top_p: int,
             batch_size: int, workers: int, max_bad_fraction: float, progress: Progress | None) -> None:
    channels_last = device.type == "cuda" and len(pool.input_shape) == 3  # faster convolutions on tensor cores
    net = net.to(device).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    reader = ShardReader(pool, shards, batch_size, view.per_sample, max_bad_fraction)
    parts: dict[int, list] = {}
    for item in loader(reader, min(workers, len(shards))):
        shard = item["shard"]
        if "end" in item:
            _write_shard(out, pool, shard, parts.pop(shard, []), item["skipped"], top_p)
            if progress is not None:
                progress.advance(len(item["skipped"]))  # so that a finished share reads total/total
            if preemption.received():  # asked to stop: keep what is written, take no further shard
                return
            continue
        # uint8 travels to the device and is normalized there: 4x less to copy than float32
        x = view.batch(item["input"].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = net(x)
        probs, classes = torch.softmax(logits.float(), dim=1).topk(top_p, dim=1)
        # kept on the device until the shard is complete: no synchronization per batch
        parts.setdefault(shard, []).append((item["keys"], item["positions"], classes, probs, item["truth"]))
        if progress is not None:
            progress.advance(len(item["keys"]))


def _keys(keys: list[str]) -> np.ndarray:
    return np.array([k.encode() for k in keys], dtype="S") if keys else np.zeros(0, "S1")


def _write_shard(out: Path, pool: Manifest, shard: int, parts: list, skipped: list[str], top_p: int) -> None:
    info = pool.shards[shard]

    def column(i: int, dtype, empty_shape) -> np.ndarray:
        return torch.cat([p[i] for p in parts]).cpu().numpy().astype(dtype) if parts else np.zeros(empty_shape, dtype)

    classes, probs = column(2, np.int32, (0, top_p)), column(3, np.float32, (0, top_p))
    truth = column(4, np.int32, (0,))
    stats = LabelStats(pool.num_classes)
    stats.add(classes[:, 0], probs[:, 0], truth)
    arrays = dict(keys=_keys([k for p in parts for k in p[0]]), positions=column(1, np.int32, (0,)), classes=classes, probs=probs,
                  truth=truth, skipped=_keys(skipped), **stats.arrays(),
                  source=np.array(json.dumps({"shard": shard, "url": info.url, "sha256": info.sha256, "num_samples": info.num_samples})))
    atomic_write(out / output_name(shard), lambda handle: np.savez(handle, **arrays))


# ----------------------------------------------------------------------------------------------
# the synchronization point


def key_hashes(keys: np.ndarray) -> np.ndarray:
    """64-bit FNV-1a of each key's bytes, vectorized over the fixed-width array (NUL padding skipped)."""
    hashes = np.full(len(keys), 0xCBF29CE484222325, np.uint64)
    if len(keys) == 0:
        return hashes
    codes = np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), keys.dtype.itemsize)
    prime = np.uint64(0x100000001B3)
    for column in codes.T:
        hashes = np.where(column != 0, (hashes ^ column.astype(np.uint64)) * prime, hashes)
    return hashes


def _repeated_keys(paths: list[Path], hashes: list[np.ndarray]) -> dict[bytes, list[str]]:
    """Keys present more than once, with the files that hold them. 8 bytes per sample in memory;
    equal hashes are confirmed by comparing the keys themselves, so a collision is no error."""
    if not hashes:
        return {}
    everything = np.sort(np.concatenate(hashes))
    suspects = np.unique(everything[1:][everything[1:] == everything[:-1]])
    if len(suspects) == 0:
        return {}
    seen: dict[bytes, list[str]] = {}
    for path, shard_hashes in zip(paths, hashes):
        hit = np.isin(shard_hashes, suspects)
        if hit.any():
            preds = read_predictions(path)
            for key in np.concatenate([preds.keys, preds.skipped])[hit]:
                seen.setdefault(bytes(key), []).append(path.name)
    return {key: files for key, files in seen.items() if len(files) > 1}


def _publish(pool: Manifest, out: Path, job: dict) -> dict:
    """Rank 0, after every rank finished: check the output key set against the manifest, publish."""
    expected = {output_name(i) for i in range(len(pool.shards))}
    strangers = sorted(p.name for p in out.glob("predictions-*.npz") if p.name not in expected)
    if strangers:
        raise UserError(f"{out} holds predictions of shards the pool does not have ({strangers[0]}...): remove the folder and run again")
    stats = LabelStats(pool.num_classes)
    paths, hashes, shards, missing = [], [], [], []
    for index, info in enumerate(pool.shards):
        path = out / output_name(index)
        if not path.is_file():
            missing.append(index)
            continue
        with np.load(path, allow_pickle=False) as data:
            source = json.loads(str(data["source"]))
            keys, skipped = data["keys"], data["skipped"]
            if (source["url"], source["sha256"]) != (info.url, info.sha256):
                raise UserError(f"{path} holds predictions of {source['url']} (sha256 {source['sha256'][:12]}), not of the pool's shard {info.url}")
            if len(keys) + len(skipped) != info.num_samples:
                raise UserError(f"{path} holds {len(keys)} keys and {len(skipped)} skipped; the manifest lists {info.num_samples} for {info.url}")
            stats.merge(LabelStats.from_arrays(data, pool.num_classes))
        paths.append(path)
        hashes.append(key_hashes(np.concatenate([keys, skipped])))
        shards.append({"file": path.name, "shard": index, "url": info.url, "num_samples": len(keys), "corrupt_samples": len(skipped),
                       "bytes": path.stat().st_size})
    if missing:
        raise UserError(
            f"pseudo-labels are incomplete: {len(missing)} of {len(pool.shards)} shards have no predictions "
            f"(first: {pool.shards[missing[0]].url}); run the same command again to finish them"
        )
    repeated = _repeated_keys(paths, hashes)
    if repeated:
        key, files = next(iter(repeated.items()))
        raise UserError(f"key {key.decode(errors='replace')!r} was labeled {len(files)} times (in {', '.join(files)}); {len(repeated)} keys repeat")
    total, corrupt = sum(s["num_samples"] for s in shards), sum(s["corrupt_samples"] for s in shards)
    if total + corrupt != pool.num_samples:
        raise UserError(f"{total} samples were labeled and {corrupt} skipped; the manifest of {pool.root} says {pool.num_samples}")
    manifest = dict(job, num_samples=total, corrupt_samples=corrupt, shards=shards, statistics=stats.summary(pool.data["class_names"]))
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------
# entry points


def label_pool(net: torch.nn.Module, pool: Manifest, view, out: Path, job: dict, cfg: InferenceConfig) -> dict:
    """Predict every sample of `pool` into `out` (resuming what is there); returns the published manifest.

    `job` says where the predictions come from (checkpoint, step, weights...); a folder that holds
    another job is refused. Call it on every rank; it holds the run lock of `out`. After a signal
    (engine/preemption.py) every rank stops after its current shard: `Preempted`, nothing published.
    """
    with run_lock(out):
        return _label_pool(net, pool, view, Path(out), job, cfg)


def _label_pool(net: torch.nn.Module, pool: Manifest, view, out: Path, job: dict, cfg: InferenceConfig) -> dict:
    from dist_ssl.engine.accelerator import on_main, process_state

    state = process_state()
    dtype = autocast_dtype(cfg.precision, state.device)
    top_p = min(cfg.top_p, pool.num_classes)
    job = dict(
        format=FORMAT, **job, pool=str(pool.root.resolve()), pool_manifest_sha256=sha256_file(pool.root / "manifest.json"),
        source=pool.data.get("source"), num_classes=pool.num_classes, class_names=pool.data["class_names"],
        top_p=top_p, precision=_precision_name(dtype),
    )

    def prepare() -> dict:
        check_local_shards(pool)
        published = claim_folder(out, job, "pseudo-labels")
        if published is not None:
            return {"published": published}
        return {"done": [i for i in range(len(pool.shards)) if (out / output_name(i)).is_file()]}

    decision = on_main(state, prepare)
    if "published" in decision:
        if state.is_main_process:
            print(f"pseudo-labels in {out} are complete ({decision['published']['num_samples']} samples): nothing to do", flush=True)
        return decision["published"]
    finished = set(decision["done"])
    pending = [i for i in range(len(pool.shards)) if i not in finished]
    block = contiguous_blocks([pool.shards[i].num_samples for i in pending], state.num_processes)[state.process_index]
    mine = [pending[i] for i in block]
    todo = sum(pool.shards[i].num_samples for i in pending)
    if state.is_main_process:
        print(f"pseudo-labeling {todo} samples of {len(pending)} shards ({len(finished)} done before) on "
              f"{state.num_processes} process(es), {_precision_name(dtype)}, top-{top_p} -> {out}", flush=True)
    started = time.time()
    if mine:
        progress = None
        if state.is_main_process:  # its own share: the others' would take a collective
            label = "pseudo-label" if state.num_processes == 1 else f"pseudo-label (rank 0 of {state.num_processes})"
            progress = Progress(label, sum(pool.shards[i].num_samples for i in mine), "samples", every=LINE_EVERY_BATCHES * cfg.batch_size)
        _predict(net, pool, view, mine, out, state.device, dtype, top_p, cfg.batch_size, cfg.workers, cfg.max_bad_fraction, progress)
    state.wait_for_everyone()
    seconds = time.time() - started
    stop = preemption.stop_requested()
    if stop:
        written = on_main(state, lambda: sum((out / output_name(i)).is_file() for i in range(len(pool.shards))))
        raise preemption.Preempted(stop, f"after writing {written} of {len(pool.shards)} prediction shards to {out}")
    manifest = on_main(state, lambda: _publish(pool, out, job))
    if state.is_main_process:
        stats = manifest["statistics"]
        accuracy = "" if stats["accuracy"] is None else f", accuracy vs hidden truth {stats['accuracy']:.4f}"
        corrupt = f"; {manifest['corrupt_samples']} corrupt samples skipped" if manifest["corrupt_samples"] else ""
        print(f"pseudo-labeled {todo} samples in {seconds:.1f} s ({todo / max(seconds, 1e-9):.0f} samples/s); "
              f"pool: mean confidence {stats['mean_confidence'] or 0:.4f}{accuracy}{corrupt}", flush=True)
    return manifest


def pseudo_label(checkpoint: str | Path, pool_dir: str | Path, out: str | Path, cfg: InferenceConfig) -> dict:
    """`dist-ssl pseudo-label CHECKPOINT --shards POOL --out DIR`: the evaluated network of a
    checkpoint (its EMA when saved) labels the pool, normalized as the checkpoint was trained."""
    from dist_ssl.data.transforms import build_views
    from dist_ssl.engine.evaluate import check_matches, load_network

    loaded = load_network(checkpoint, cfg.weights)
    pool = pool_manifest(pool_dir, cfg.allow_pipe)
    check_matches(pool, loaded.meta)
    views = build_views(pool.kind, pool.input_shape, loaded.meta["mean"], loaded.meta["std"], loaded.cfg.data.augment)
    job = {"checkpoint": str(loaded.folder.resolve()), "step": loaded.meta["step"], "model": loaded.meta["model"],
           "weights": "ema" if loaded.ema else "raw"}
    return label_pool(loaded.net, pool, views["plain"], Path(out), job, cfg)
