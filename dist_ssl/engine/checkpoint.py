"""Checkpoints as `step-N` folders that either exist completely or do not count.

Why not `accelerator.save_state`: with `total_limit` it deletes old checkpoints *before* writing
the new one, and `load_state` picks a folder without checking it is complete. Here:

1. every rank writes its files (tmp name, fsync, rename); rank 0 writes the shared ones;
2. barrier;
3. rank 0 writes `meta.json`, then the `COMMITTED` marker last (tmp, fsync, rename, fsync dir);
4. only then are older checkpoints pruned to `keep_last`, never the newest committed one; a pruned
   folder is first renamed out of the `step-N` namespace, so a crash mid-delete never leaves a
   committed folder with files missing.

A folder without the marker is the leftover of a crash and is never loaded. Everything loads with
`torch.load(weights_only=True)`: a checkpoint cannot execute code.

Files: `model.pt` (networks and their EMA by role: what `evaluate` needs), `training.pt`
(optimizers, schedules and the fp16 grad scaler by role, counters), `rank-NNNNN.pt` (each rank's
RNG states, stream positions, method state and unflushed logging window), `config.yaml` (the
resolved config), `meta.json` (identity, world size, why it was written).

When a checkpoint is written (every N epochs/steps/minutes, on a signal) is decided in
`engine/preemption.py`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_ssl.errors import UserError
from dist_ssl.files import atomic_torch_save, atomic_write_text, fsync_dir, writing  # noqa: F401 (tests patch them here)

FORMAT = "dist-ssl-checkpoint/1"
MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_PRUNED = ".pruned"  # suffix of a folder being deleted; never a checkpoint
# Config keys that change neither the weights nor the data a resumed run sees.
BOOKKEEPING_KEYS = frozenset({
    "train.output_dir", "train.resume", "train.keep_last", "train.log_every_steps", "train.eval_every_epochs",
    "train.checkpoint_every_epochs", "train.checkpoint_every_steps", "train.checkpoint_every_minutes",
    "data.eval_batch_size", "data.augment.path", "train.cpu_allocator",  # the same views, the same arithmetic
})


def committed(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = committed(root)
    return found[-1][1] if found else None


def refuse_to_mix(root: Path, start_step: int, why: str) -> None:
    """A run must not write into a checkpoints folder that already holds committed checkpoints newer
    than its own start: `save` keeps an already committed step-N folder, so the folder would mix two
    runs and a later `resume=auto` would pick the other run's weights."""
    newer = [folder for step, folder in committed(root) if step > start_step]
    if newer:
        raise UserError(
            f"{root} already holds committed checkpoints newer than this run's start at step {start_step} ({why}), "
            f"up to {newer[-1].name}: they would mix with this run's; use another train.output_dir or move {root} away"
        )


def resolve(path: str | Path) -> Path:
    """A committed checkpoint folder from a step-N folder, a checkpoints folder or a run folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if (path / "meta.json").is_file() or (path / MARKER).is_file() or _STEP_DIR.match(path.name):
        check_ours(path)
        return path
    for root in (path / "checkpoints", path):
        newest = latest(root)
        if newest is not None:
            return newest
    raise UserError(f"{path} is not a dist-ssl checkpoint: no committed step-N folder in it")


def check_ours(path: Path) -> dict:
    if _STEP_DIR.match(path.name) and not (path / MARKER).is_file():
        raise UserError(f"checkpoint {path} is incomplete (no {MARKER} marker: its write was interrupted)")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a dist-ssl checkpoint (no valid meta.json of format {FORMAT!r})")
    if not (path / MARKER).is_file():
        raise UserError(f"checkpoint {path} is incomplete (no {MARKER} marker: its write was interrupted)")
    return meta


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "gauss": [int(np_state[3]), float(np_state[4])]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["gauss"][0], numpy["gauss"][1]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def network_weights(folder: Path, weights: str = "auto") -> tuple[dict, bool]:
    """(state dict, is_ema) of the evaluated network of a committed checkpoint: its EMA when one was
    saved and `weights` is 'auto' or 'ema', else the raw weights."""
    meta = check_ours(folder)
    models = load_file(folder / "model.pt")
    role = meta["eval_role"]
    use_ema = weights == "ema" or (weights == "auto" and role in models["emas"])
    if use_ema and role not in models["emas"]:
        raise UserError(f"checkpoint {folder} has no EMA weights; use --weights raw")
    if use_ema:  # AveragedModel's state: 'module.'-prefixed weights plus n_averaged
        return {k.removeprefix("module."): v for k, v in models["emas"][role].items() if k.startswith("module.")}, True
    return models["nets"][role], False


def load_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint file missing: {path}") from None
    except Exception as exc:
        raise UserError(f"checkpoint file {path} cannot be read safely: {str(exc).splitlines()[0]}") from None


def save(
    root: Path,
    step: int,
    accelerator,
    shared: dict[str, Any],
    per_rank: dict[str, Any],
    meta: dict,
    config_text: str,
    keep_last: int,
) -> Path:
    """Write and commit `root/step-{step}`. `shared` maps file stem -> object (rank 0 writes it)."""
    path = root / f"step-{step}"
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    if (path / MARKER).is_file():  # already committed (a run resumed at its very end)
        return path
    accelerator.wait_for_everyone()  # everyone has looked before rank 0 touches the folder
    failure = None
    if main:
        try:
            with writing(path):
                shutil.rmtree(path, ignore_errors=True)  # an uncommitted leftover of a crash
                path.mkdir(parents=True)
        except UserError as exc:
            failure = exc
    accelerator.wait_for_everyone()
    if failure is None:  # the other ranks find no folder and fail alike
        try:
            with writing(path):
                if main:
                    for stem, obj in shared.items():
                        atomic_torch_save(obj, path / f"{stem}.pt")
                    atomic_write_text(path / "config.yaml", config_text)
                atomic_torch_save(per_rank, path / f"rank-{accelerator.process_index:05d}.pt")
                fsync_dir(path)  # each rank makes its own renames durable (ranks may sit on other nodes)
        except UserError as exc:
            failure = exc
    _agree_or_discard(path, failure, accelerator)
    if main:
        try:
            with writing(path):
                atomic_write_text(path / "meta.json", json.dumps(dict(meta, format=FORMAT, step=step, saved_at=time.time()), indent=1))
                fsync_dir(path)
                atomic_write_text(path / MARKER, f"{step}\n")
                fsync_dir(path)
        except UserError as exc:
            failure = exc
    _agree_or_discard(path, failure, accelerator)
    if main:
        with writing(root):
            prune(root, keep_last)
    accelerator.wait_for_everyone()
    return path


def _agree_or_discard(path: Path, failure: UserError | None, accelerator) -> None:
    """Instead of a barrier: when any rank could not write its part (a full or read-only disk), every
    rank raises the first such error, and rank 0 removes the partial folder, so it never lingers as a
    candidate and the previous committed checkpoint stays the one a rerun resumes."""
    errors = [str(failure) if failure is not None else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        errors = gather_object(errors)
    first = next((e for e in errors if e is not None), None)
    if first is None:
        return
    if accelerator.is_main_process and not (path / MARKER).is_file():
        shutil.rmtree(path, ignore_errors=True)
    if isinstance(failure, UserError):
        raise failure
    raise UserError(first)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` committed checkpoints; drop crash leftovers older than the newest.

    A folder is renamed out of the `step-N` namespace before it is deleted: a crash in the middle
    of the delete leaves a `.pruned` folder that nothing loads, never a half-deleted checkpoint."""
    found = committed(root)
    if not found:
        return
    newest_step = found[-1][0]
    doomed = [old for _, old in found[: max(0, len(found) - keep_last)]]
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and not (child / MARKER).is_file() and int(match.group(1)) < newest_step:
            doomed.append(child)
    for folder in doomed:
        trash = folder.with_name(folder.name + _PRUNED)
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
    if doomed:
        fsync_dir(root)
    for child in root.iterdir():
        if child.name.endswith(_PRUNED):
            shutil.rmtree(child, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# what a checkpoint holds, keyed by role so that any method's networks are saved alike


def sync_buffers(modules, accelerator) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics, EMA counters).

    Under DDP each rank updates rank 0's broadcast statistics with its own batch, so after a step
    the ranks' buffers differ, and an EMA that averages buffers drifts apart per rank. DDP re-sends
    rank 0's buffers before the next forward, so training never reads the other ranks' copies; but
    an evaluation would mix them, and a checkpoint (rank 0's copy) would not hold the other ranks'
    state. Called before both, it makes the evaluated and the saved model the same on every rank."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _unwrapped(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers in AcceleratedOptimizer


def snapshot(nets: dict, emas: dict, optimizers: dict, schedulers: dict, scaler, counters: dict) -> dict[str, Any]:
    """The files rank 0 writes: `model` (what evaluation needs) and `training` (the rest of a resume).

    `nets` are the unwrapped networks by role, `scaler` the fp16 GradScaler or None."""
    return {
        "model": {"nets": {r: n.state_dict() for r, n in nets.items()}, "emas": {r: e.state_dict() for r, e in emas.items()}},
        "training": {
            "optimizers": {r: o.state_dict() for r, o in optimizers.items()},
            "optimizer_types": {r: type(_unwrapped(o)).__name__ for r, o in optimizers.items()},
            "schedulers": {r: s.state_dict() for r, s in schedulers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": counters,
        },
    }


def _refuse(path: Path, what: str) -> UserError:
    return UserError(f"checkpoint {path} is incompatible with this config: {what} (use another train.output_dir, or train.resume=never)")


def _check_shapes(path: Path, role: str, saved: dict, net) -> None:
    here = {name: tuple(t.shape) for name, t in net.state_dict().items()}
    there = {name: tuple(t.shape) for name, t in saved.items()}
    for name in sorted(here.keys() | there.keys()):
        if here.get(name) != there.get(name):
            shown = {k: "absent" if v is None else list(v) for k, v in (("there", there.get(name)), ("here", here.get(name)))}
            raise _refuse(path, f"{role} network tensor '{name}' is {shown['there']} there, {shown['here']} here")


def rank_file(path: Path, rank: int) -> Any:
    """One rank's own state; a clear error when the checkpoint was written by fewer processes."""
    file = path / f"rank-{rank:05d}.pt"
    if not file.is_file() and (path / "meta.json").is_file():
        world = json.loads((path / "meta.json").read_text()).get("world_size")
        raise UserError(f"checkpoint {path} was written by {world} processes but holds no state for rank {rank}: a file is missing")
    return load_file(file)


def restore(path: Path, rank: int | None, nets: dict, emas: dict, optimizers: dict, schedulers: dict, scaler) -> tuple[dict, dict]:
    """Load a committed checkpoint into freshly built objects (before `accelerator.prepare`).

    Returns (counters, this rank's own state, or None when `rank` is None). Refuses, naming what differs, a checkpoint whose
    networks or optimizers do not fit: another architecture or width, another optimizer type."""
    models = load_file(path / "model.pt")
    training = load_file(path / "training.pt")
    mine = rank_file(path, rank) if rank is not None else None
    for role, net in nets.items():
        if role not in models["nets"]:
            raise _refuse(path, f"it has no '{role}' network (it has {', '.join(models['nets'])})")
        _check_shapes(path, role, models["nets"][role], net)
    for name, optimizer in optimizers.items():  # by optimizer name: SMPL steps one network with two
        if name not in training["optimizer_types"]:
            raise _refuse(path, f"it has no '{name}' optimizer (it has {', '.join(training['optimizer_types'])})")
        kind, saved_kind = type(_unwrapped(optimizer)).__name__, training["optimizer_types"][name]
        if kind != saved_kind:
            raise _refuse(path, f"the {name} optimizer is {saved_kind} there, {kind} here")
    for role, net in nets.items():
        net.load_state_dict(models["nets"][role])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(training["optimizers"][name])
        schedulers[name].load_state_dict(training["schedulers"][name])
    for role, ema in emas.items():
        if role in models["emas"]:  # EMA switched on since: it starts from the current weights
            ema.load_state_dict(models["emas"][role])
    if scaler is not None and training["scaler"] is not None:
        scaler.load_state_dict(training["scaler"])
    return training["state"], mine


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(path: Path, resolved: dict) -> list[str]:
    """'key: old -> new' for every setting that differs from the checkpoint's and may change the run."""
    import yaml

    try:
        saved = _flatten(yaml.safe_load((path / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        return ["config.yaml: unreadable in the checkpoint"]
    now = _flatten(resolved)
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in sorted(saved.keys() | now.keys())
            if key not in BOOKKEEPING_KEYS and saved.get(key) != now.get(key)]


# ----------------------------------------------------------------------------------------------
# a run's checkpointer: named stateful pieces in, step-N folders out


class RngState:
    """Each rank's RNGs (python, numpy, torch, CUDA) as a piece of the rank file. Restored ones are
    applied by `apply()`, called just before the first step: whatever runs in between (building
    DataLoader iterators, say) cannot shift them. A rank the saved run did not have seeds its own."""

    def __init__(self, fresh_seed: int):
        self.fresh_seed = fresh_seed
        self.pending: dict | None = None

    def state_dict(self) -> dict:
        return rng_state()

    def restore(self, own: dict | None, every_rank) -> None:
        self.pending = own

    def apply(self) -> None:
        if self.pending is not None:
            set_rng_state(self.pending)
        else:  # a fresh run, or a rank the saved run did not have
            from accelerate.utils import set_seed

            set_seed(self.fresh_seed)


class RankPiece:
    """An object with state_dict()/load_state_dict() as a piece of the rank file. A rank that the
    saved run did not have loads rank 0's state (`fallback="rank0"`) or keeps its own (`"keep"`)."""

    def __init__(self, obj, fallback: str = "keep"):
        self.obj, self.fallback = obj, fallback

    def state_dict(self) -> dict:
        return self.obj.state_dict()

    def restore(self, own: dict | None, every_rank) -> None:
        if own is not None:
            self.obj.load_state_dict(own)
        elif self.fallback == "rank0":
            self.obj.load_state_dict(every_rank()[0])


class Checkpointer:
    """Saves and restores a run as `step-N` folders (`save`, `restore` above), from named pieces:

    * shared, written once by rank 0: the networks and their EMAs by role, the optimizers and
      schedules by name, the fp16 grad scaler, the run's counters;
    * each rank's own, in its rank file: `own` maps a name to a piece with `state_dict()` and
      `restore(own_state_or_None, every_rank)`, where `every_rank()` returns that piece's state in
      every rank file of the checkpoint (a stream resumed on another layout needs them all).

    `meta` identifies the run (method, model, classes, input shape...); `save` adds the world size,
    the epoch and the reason."""

    def __init__(self, root: Path, accelerator, nets: dict, emas: dict, optimizers: dict, schedulers: dict,
                 own: dict, meta: dict, config_text: str, keep_last: int, steps_per_epoch: int):
        self.root, self.accelerator = root, accelerator
        self.nets, self.emas, self.optimizers, self.schedulers = nets, emas, optimizers, schedulers
        self.own, self.meta, self.config_text = own, meta, config_text
        self.keep_last, self.steps_per_epoch = keep_last, steps_per_epoch

    def save(self, step: int, counters: dict, reason: str) -> Path:
        sync_buffers([*self.nets.values(), *self.emas.values()], self.accelerator)
        shared = snapshot(self.nets, self.emas, self.optimizers, self.schedulers, self.accelerator.scaler, counters)
        own = {name: piece.state_dict() for name, piece in self.own.items()}
        meta = dict(self.meta, world_size=self.accelerator.num_processes, epoch=step / self.steps_per_epoch, reason=reason)
        return save(self.root, step, self.accelerator, shared, own, meta, self.config_text, self.keep_last)

    def restore(self, path: Path) -> dict:
        """Load `path` into the freshly built pieces (before `accelerator.prepare`); the counters."""
        saved_world = check_ours(path).get("world_size", self.accelerator.num_processes)
        rank = self.accelerator.process_index
        mine_rank = rank if rank < saved_world else None  # more processes now: no file of its own
        counters, mine = restore(path, mine_rank, self.nets, self.emas, self.optimizers, self.schedulers, self.accelerator.scaler)
        files: list = []

        def every_rank_of(name: str):
            def states() -> list:
                if not files:
                    files.extend(rank_file(path, r) for r in range(saved_world))
                return [f[name] for f in files]
            return states

        for name, piece in self.own.items():
            piece.restore(mine[name] if mine is not None else None, every_rank_of(name))
        return counters
