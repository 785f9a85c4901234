"""Checkpoints as `step-N` folders that either exist completely or do not count.

Why not `accelerator.save_state`: with `total_limit` it deletes old checkpoints *before* writing
the new one, and `load_state` picks a folder without checking it is complete. Here:

1. every rank writes its files (tmp name, fsync, rename); rank 0 writes the shared ones;
2. barrier;
3. rank 0 writes `meta.json`, then the `COMMITTED` marker last (tmp, fsync, rename, fsync dir);
4. only then are older checkpoints pruned to `keep_last`, never the newest committed one.

A folder without the marker is the leftover of a crash and is never loaded. Everything loads with
`torch.load(weights_only=True)`: a checkpoint cannot execute code.

Files: `model.pt` (networks and their EMA: what `evaluate` needs), `training.pt` (optimizers,
schedules, method state, counters), `rank-NNNNN.pt` (each rank's RNG and stream positions),
`config.yaml` (the resolved config), `meta.json`.
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

FORMAT = "dist-ssl-checkpoint/1"
MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
    if main:
        shutil.rmtree(path, ignore_errors=True)  # an uncommitted leftover of a crash
        path.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if main:
        for stem, obj in shared.items():
            atomic_torch_save(obj, path / f"{stem}.pt")
        atomic_write_text(path / "config.yaml", config_text)
    atomic_torch_save(per_rank, path / f"rank-{accelerator.process_index:05d}.pt")
    accelerator.wait_for_everyone()
    if main:
        atomic_write_text(path / "meta.json", json.dumps(dict(meta, format=FORMAT, step=step, saved_at=time.time()), indent=1))
        _fsync_dir(path)
        atomic_write_text(path / MARKER, f"{step}\n")
        _fsync_dir(path)
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return path


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` committed checkpoints; drop crash leftovers older than the newest."""
    found = committed(root)
    if not found:
        return
    newest_step = found[-1][0]
    for _, old in found[: max(0, len(found) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and not (child / MARKER).is_file() and int(match.group(1)) < newest_step:
            shutil.rmtree(child, ignore_errors=True)
