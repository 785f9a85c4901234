"""Selecting pseudo-labeled samples into a labeled split that `dist-ssl train` reads.

Policies (config `select.*`, see `SelectConfig`): per-class top-K by score among each sample's
top-P classes (billion-scale: a sample may be picked for several classes), a confidence threshold
on the top-1 class, the most confident `sample_rate` fraction of each predicted class, or all.
With `soft`, each sample also carries the teacher's class probabilities (`KEY.soft.npy`; the top-P
renormalized), which the training loop uses as the labeled target.

How it scales to a billion-image pool:

1. Rank 0 plans: it streams the prediction files (never the images) and keeps, per class, only
   the best candidates so far (memory O(classes x K), pruned in vectorized passes). The plan,
   (pool shard, position, label) sorted by position in the pool, is written to `plan.npz` once.
2. The plan is cut into output shards of about `maxcount` samples; ranks write contiguous blocks
   of them. A writer streams the few pool shards its rows come from, copies the selected samples'
   encoded bytes unchanged (no decode, no re-encode) and adds `cls` (+ `soft.npy`, + `truth.cls`).
   Each output is written atomically, with a sidecar `.json` (count, bytes, sha256, histogram)
   marking it finished, so the job resumes by output shard with any number of processes.
3. Rank 0 checks every output against the plan and publishes a shards manifest (the format of
   `dist-ssl shards write`) with the selection's statistics: per-class counts, mean confidence
   and accuracy against the hidden truth when the pool has it.

With `include_labeled`, the labeled split is copied in too, spread evenly over the output shards
(self-training rounds train on labels + pseudo-labels).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from dist_ssl.config import SelectConfig
from dist_ssl.data.shards.codec import INPUT_EXTENSIONS
from dist_ssl.data.shards.manifest import FORMAT as SHARDS_FORMAT
from dist_ssl.data.shards.manifest import (
    DataError,
    Manifest,
    load_manifest,
    sha256_file,
)
from dist_ssl.data.shards.tar import raw_samples
from dist_ssl.engine import preemption
from dist_ssl.engine.lock import run_lock
from dist_ssl.engine.logging import Progress
from dist_ssl.errors import UserError
from dist_ssl.files import atomic_write, atomic_write_json
from dist_ssl.inference.jobs import MANIFEST, claim_folder, contiguous_blocks
from dist_ssl.inference.pseudo_label import load_predictions_manifest, read_predictions
from dist_ssl.inference.label_stats import LabelStats

JOB_FORMAT = "dist-ssl-selection/1"
PLAN = "plan.npz"
_FIELDS = ("shard", "row", "label", "score", "truth")


def output_name(index: int) -> str:
    return f"selected-{index:06d}.tar"


def _sidecar(out: Path, index: int) -> Path:
    return out / f"selected-{index:06d}.json"


# ----------------------------------------------------------------------------------------------
# 1. the plan


def _best_per_class(candidates: dict[str, np.ndarray], budget: np.ndarray) -> dict[str, np.ndarray]:
    """Per label, the `budget[label]` highest scores; ties go to the earlier sample in the pool."""
    c = candidates
    order = np.lexsort((c["row"], c["shard"], -c["score"], c["label"]))
    labels = c["label"][order]
    rank = np.arange(len(order)) - np.searchsorted(labels, labels, side="left")
    keep = order[rank < budget[labels]]
    return {name: values[keep] for name, values in c.items()}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in _FIELDS}


def _candidates(shard: int, preds, columns: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """(shard, row, label, score, truth) for the first `columns` of each row's top-P."""
    n = len(preds.keys)
    rows = np.arange(n) if rows is None else rows
    return {
        "shard": np.full(len(rows) * columns, shard, np.int32),
        "row": np.repeat(rows, columns).astype(np.int32),
        "label": preds.classes[rows, :columns].reshape(-1).astype(np.int32),
        "score": preds.probs[rows, :columns].reshape(-1).astype(np.float32),
        "truth": np.repeat(preds.truth[rows], columns).astype(np.int32),
    }


def plan_selection(predictions: Path, manifest: dict, cfg: SelectConfig) -> dict[str, np.ndarray]:
    """The selected (shard, row, label, score, truth), sorted by (shard, row, label)."""
    num_classes = manifest["num_classes"]
    parts: list[dict[str, np.ndarray]] = []
    if cfg.policy in ("threshold", "all"):
        floor = cfg.threshold if cfg.policy == "threshold" else -1.0
        for entry in manifest["shards"]:
            preds = read_predictions(predictions / entry["file"])
            parts.append(_candidates(entry["shard"], preds, 1, np.nonzero(preds.probs[:, 0] >= floor)[0]))
        plan = _concat(parts) if parts else {name: np.zeros(0, np.int32) for name in _FIELDS}
    else:
        if cfg.policy == "top_k":
            budget, columns = np.full(num_classes, cfg.top_k, np.int64), manifest["top_p"]
        else:  # sample_rate: a fraction of each predicted class, by the pool's top-1 class counts
            counts = np.asarray(manifest["statistics"]["class_histogram"], np.float64)
            budget, columns = np.ceil(counts * cfg.sample_rate - 1e-9).astype(np.int64), 1
        limit = max(2 * int(budget.sum()), 1 << 20)  # prune whenever the buffer outgrows this
        best = {name: np.zeros(0, np.float32 if name == "score" else np.int32) for name in _FIELDS}
        buffered = 0
        for entry in manifest["shards"]:
            parts.append(_candidates(entry["shard"], read_predictions(predictions / entry["file"]), columns))
            buffered += len(parts[-1]["row"])
            if buffered > limit:
                best, parts, buffered = _best_per_class(_concat([best, *parts]), budget), [], 0
        plan = _best_per_class(_concat([best, *parts]), budget)
    order = np.lexsort((plan["label"], plan["row"], plan["shard"]))
    return {name: values[order] for name, values in plan.items()}


# ----------------------------------------------------------------------------------------------
# 2. writing output shards


def _chunks(selected: int, labeled: int, maxcount: int) -> int:
    return math.ceil((selected + labeled) / maxcount)


def _chunk_rows(selected: int, chunks: int, index: int) -> range:
    return range(index * selected // chunks, (index + 1) * selected // chunks)


def _member(raw: dict, where: str) -> str:
    for ext in INPUT_EXTENSIONS:
        if ext in raw:
            return ext
    raise DataError(f"{where}: sample {raw.get('__key__')} has no image or npy member")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, np.float32), allow_pickle=False)
    return buffer.getvalue()


def _pseudo_samples(plan: dict, rows: range, repeated: np.ndarray, pool: Manifest, predictions: Path, manifest: dict, soft: bool):
    """The chunk's selected samples, in plan order, read from the pool shards they live in."""
    files = {entry["shard"]: entry["file"] for entry in manifest["shards"]}
    shards = plan["shard"][rows.start : rows.stop]
    num_classes = pool.num_classes
    for shard in np.unique(shards):
        idx = rows.start + np.nonzero(shards == shard)[0]  # plan rows of this shard, by position
        preds = read_predictions(predictions / files[int(shard)])
        info = pool.shards[int(shard)]
        url = pool.url(info)
        cursor = 0
        for position, raw in enumerate(raw_samples(url, info)):
            while cursor < len(idx) and preds.positions[plan["row"][idx[cursor]]] == position:
                i = idx[cursor]
                row = int(plan["row"][i])
                key, expected = raw["__key__"], preds.keys[row].decode()
                if key != expected:
                    raise DataError(f"{url} changed after it was pseudo-labeled: position {position} holds {key!r}, the predictions say {expected!r}")
                label = int(plan["label"][i])
                member = _member(raw, url)
                sample = {"__key__": f"{key}-c{label}" if repeated[i] else key, member: raw[member], "cls": str(label).encode()}
                if plan["truth"][i] >= 0:
                    sample["truth.cls"] = str(int(plan["truth"][i])).encode()
                if soft:
                    target = np.zeros(num_classes, np.float64)
                    target[preds.classes[row]] = preds.probs[row]
                    sample["soft.npy"] = _npy(target / target.sum())
                yield sample
                cursor += 1
            if cursor == len(idx):
                break
        if cursor < len(idx):
            raise DataError(f"{url} ended before position {int(preds.positions[plan['row'][idx[cursor]]])}: it changed after it was pseudo-labeled")


def _labeled_samples(labeled: Manifest, chunks: int, index: int, soft: bool) -> list[dict]:
    """Every `chunks`-th sample of the labeled split from `index` on: this chunk's share."""
    out, position = [], 0
    for info in labeled.shards:
        url = labeled.url(info)
        for raw in raw_samples(url, info):
            if position % chunks == index:
                if "cls" not in raw:
                    raise DataError(f"{url}: sample {raw['__key__']} of the labeled split has no label (cls)")
                member = _member(raw, url)
                sample = {"__key__": raw["__key__"], member: raw[member], "cls": raw["cls"]}
                if soft:
                    sample["soft.npy"] = _npy(np.eye(labeled.num_classes)[int(raw["cls"])])
                out.append(sample)
            position += 1
    return out


def _write_chunk(out: Path, index: int, chunks: int, plan: dict, repeated: np.ndarray, pool: Manifest, predictions: Path,
                 manifest: dict, labeled: Manifest | None, soft: bool, progress: Progress | None) -> None:
    import webdataset as wds

    rows = _chunk_rows(len(plan["row"]), chunks, index)
    extra = _labeled_samples(labeled, chunks, index, soft) if labeled is not None else []
    histogram = np.zeros(pool.num_classes, np.int64)
    count = 0

    def write(handle) -> None:
        writer = wds.TarWriter(handle, encoder=False, mtime=0)  # integer mtime: plain ustar, reproducible bytes

        def put(sample: dict) -> None:
            nonlocal count
            writer.write(sample)
            histogram[int(sample["cls"])] += 1
            count += 1
            if progress is not None:
                progress.advance()

        # labeled sample k goes before selected sample k * n // l: spread evenly through the shard
        slots = [k * len(rows) // len(extra) for k in range(len(extra))]
        pending = 0
        for i, sample in enumerate(_pseudo_samples(plan, rows, repeated, pool, predictions, manifest, soft)):
            while pending < len(extra) and slots[pending] <= i:
                put(extra[pending])
                pending += 1
            put(sample)
        for sample in extra[pending:]:
            put(sample)
        writer.close()

    tar = out / output_name(index)
    atomic_write(tar, write)
    atomic_write_json(_sidecar(out, index), {"url": tar.name, "num_samples": count, "bytes": tar.stat().st_size,
                                             "sha256": sha256_file(tar), "class_histogram": histogram.tolist()})


# ----------------------------------------------------------------------------------------------
# 3. publishing


def _publish(out: Path, chunks: int, expected: list[int], pool: Manifest, job: dict, stats: LabelStats,
             manifest: dict, labeled: Manifest | None, soft: bool) -> dict:
    shards = []
    for index in range(chunks):
        path = _sidecar(out, index)
        if not path.is_file() or not (out / output_name(index)).is_file():
            raise UserError(f"selection is incomplete: {output_name(index)} was not written; run the same command again to finish it")
        info = json.loads(path.read_text())
        if info["num_samples"] != expected[index]:
            raise UserError(f"{output_name(index)} holds {info['num_samples']} samples; the plan has {expected[index]}")
        shards.append(info)
    header = {key: pool.data[key] for key in ("source", "num_classes", "class_names", "input", "mean", "std") if key in pool.data}
    result = dict(
        format=SHARDS_FORMAT, **header, protocol=pool.data.get("protocol"), split="selected",
        num_samples=sum(s["num_samples"] for s in shards),
        class_histogram=np.sum([s["class_histogram"] for s in shards], axis=0).astype(int).tolist() if shards else [0] * pool.num_classes,
        truth_histogram=None, targets="soft" if soft else "hard",
        pseudo_labels={
            "predictions": job["predictions"], "teacher": manifest.get("checkpoint"), "teacher_step": manifest.get("step"),
            **{k: v for k, v in job.items() if k in ("policy", "top_k", "threshold", "sample_rate")},
            "labeled_included": labeled.num_samples if labeled is not None else 0,
            "statistics": stats.summary(pool.data["class_names"]),  # of the pseudo-labeled samples only
        },
        shards=shards,
    )
    atomic_write_json(out / MANIFEST, result)
    return result


def _policy(cfg: SelectConfig) -> dict:
    params = {"policy": cfg.policy, "soft": cfg.soft, "maxcount": cfg.maxcount}
    if cfg.policy in ("top_k", "threshold", "sample_rate"):
        params[cfg.policy] = getattr(cfg, cfg.policy)
    return params


def select(predictions: str | Path, out: str | Path, cfg: SelectConfig, labeled_dir: str | Path | None = None,
           allow_pipe: bool = False) -> dict:
    """Write the selection of a published pseudo-label folder as a labeled split in `out`; returns
    its manifest. `labeled_dir`: a labeled split to copy in as well. `allow_pipe`: see data.allow_pipe.
    Call it on every rank; it holds the run lock of `out`. After a signal (engine/preemption.py)
    every rank stops after its current shard: `Preempted`, nothing published."""
    with run_lock(out):
        return _select(Path(predictions), Path(out), cfg, labeled_dir, allow_pipe)


def _select(predictions: Path, out: Path, cfg: SelectConfig, labeled_dir: str | Path | None, allow_pipe: bool) -> dict:
    from dist_ssl.engine.accelerator import on_main, process_state

    manifest = load_predictions_manifest(predictions)
    pool = load_manifest(manifest["pool"], allow_pipe)
    if sha256_file(pool.root / "manifest.json") != manifest["pool_manifest_sha256"]:
        raise UserError(f"the pool {pool.root} changed after it was pseudo-labeled into {predictions}: pseudo-label it again")
    labeled = load_manifest(labeled_dir, allow_pipe) if labeled_dir is not None else None
    if labeled is not None and (labeled.num_classes != pool.num_classes or labeled.shape != pool.shape):
        raise UserError(f"labeled split {labeled.root} ({labeled.num_classes} classes, shape {labeled.shape}) does not match the pool {pool.root}")
    job = dict(
        format=JOB_FORMAT, predictions=str(predictions.resolve()), predictions_manifest_sha256=sha256_file(predictions / MANIFEST),
        **_policy(cfg), labeled=str(labeled.root.resolve()) if labeled is not None else None,
    )
    state = process_state()

    def prepare() -> dict:
        published = claim_folder(out, job, "a selection")
        if published is not None:
            return {"published": published}
        if not (out / PLAN).is_file():
            plan = plan_selection(predictions, manifest, cfg)
            if len(plan["row"]) + (labeled.num_samples if labeled is not None else 0) == 0:
                raise UserError(f"the selection is empty: no sample of {predictions} passes policy {_policy(cfg)}")
            stats = LabelStats(pool.num_classes)
            stats.add(plan["label"], plan["score"], plan["truth"])
            atomic_write(out / PLAN, lambda handle: np.savez(handle, **plan, **stats.arrays()))
        return {}

    decision = on_main(state, prepare)
    if "published" in decision:
        if state.is_main_process:
            print(f"selection in {out} is complete ({decision['published']['num_samples']} samples): nothing to do", flush=True)
        return decision["published"]
    with np.load(out / PLAN, allow_pickle=False) as data:
        plan = {name: data[name] for name in _FIELDS}
        stats = LabelStats.from_arrays(data, pool.num_classes)
    selected = len(plan["row"])
    extra = labeled.num_samples if labeled is not None else 0
    chunks = _chunks(selected, extra, cfg.maxcount)
    expected = [len(_chunk_rows(selected, chunks, j)) + len(range(j, extra, chunks)) for j in range(chunks)]
    # an image picked for two classes (top_k) appears twice: its keys get the label as a suffix
    same = (plan["shard"][1:] == plan["shard"][:-1]) & (plan["row"][1:] == plan["row"][:-1])
    repeated = np.zeros(selected, bool)
    repeated[1:] |= same
    repeated[:-1] |= same

    done = on_main(state, lambda: [j for j in range(chunks) if _sidecar(out, j).is_file()])
    pending = [j for j in range(chunks) if j not in set(done)]
    block = contiguous_blocks([expected[j] for j in pending], state.num_processes)[state.process_index]
    if state.is_main_process:
        print(f"selecting {selected} pseudo-labeled samples ({_policy(cfg)['policy']}) + {extra} labeled into "
              f"{chunks} shard(s), {len(pending)} to write on {state.num_processes} process(es) -> {out}", flush=True)
    progress = None
    if state.is_main_process and len(block):  # its own share: the others' would take a collective
        label = "select" if state.num_processes == 1 else f"select (rank 0 of {state.num_processes})"
        progress = Progress(label, sum(expected[pending[i]] for i in block), "samples", every=cfg.maxcount)  # about a line per shard
    for i in block:
        _write_chunk(out, pending[i], chunks, plan, repeated, pool, predictions, manifest, labeled, cfg.soft, progress)
        if preemption.received():  # asked to stop: keep the shards written, take no further one
            break
    state.wait_for_everyone()
    stop = preemption.stop_requested()
    if stop:
        written = on_main(state, lambda: sum(_sidecar(out, j).is_file() for j in range(chunks)))
        raise preemption.Preempted(stop, f"after writing {written} of {chunks} selected shards to {out}")
    result = on_main(state, lambda: _publish(out, chunks, expected, pool, job, stats, manifest, labeled, cfg.soft))
    if state.is_main_process:
        summary = result["pseudo_labels"]["statistics"]
        accuracy = "" if summary["accuracy"] is None else f", accuracy vs hidden truth {summary['accuracy']:.4f}"
        print(f"selected {summary['count']} pseudo-labels (mean confidence {summary['mean_confidence'] or 0:.4f}{accuracy}) "
              f"+ {extra} labeled -> {out}", flush=True)
    return result
