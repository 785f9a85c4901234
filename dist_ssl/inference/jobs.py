"""What the sharded jobs (`pseudo-label`, `select`) share.

A job writes numbered output files into its folder. Each file is written by one rank (tmp name,
fsync, rename) and never recomputed once it exists, so a job resumes file by file, with any
number of processes. Work is dealt as contiguous blocks of the files still to do, balanced by
their sample counts; a rank may get nothing and simply waits at the final barrier (no collective
runs while the ranks work, so nobody waits for a batch that never comes).

Decisions that need one consistent view of the folder (what is finished, is the result complete)
are taken by rank 0 and broadcast; a UserError there is raised on every rank, so no rank blocks
on one that gave up. The folder's `manifest.json`, written last, is the only sign that a job is
complete; `job.json`, written first, ties the folder to one job so that a rerun with other inputs
cannot mix its files with the old ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from dist_ssl.engine.lock import LOCK
from dist_ssl.errors import UserError
from dist_ssl.files import atomic_write_json

MANIFEST = "manifest.json"
JOB = "job.json"


def contiguous_blocks(sizes: Sequence[int], parts: int) -> list[range]:
    """Items 0..n-1 split into `parts` contiguous ranges of about equal total size (some may be empty).

    An item goes to the part that holds the middle of its span on the cumulative size axis, so
    the owner never decreases along the items and each part is one range.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    n = len(sizes)
    total = float(sizes.sum())
    if total > 0:
        middle = np.cumsum(sizes) - sizes / 2
        owner = np.minimum((middle * parts / total).astype(np.int64), parts - 1)
    else:
        owner = np.arange(n, dtype=np.int64) * parts // max(n, 1)
    bounds = np.searchsorted(owner, np.arange(parts + 1), side="left")
    return [range(int(bounds[p]), int(bounds[p + 1])) for p in range(parts)]


def claim_folder(out: Path, job: dict, what: str) -> dict | None:
    """Rank 0: make `out` the folder of `job`. Returns its manifest when the job already finished.

    A folder of another job (other checkpoint, pool, parameters) is refused, never overwritten;
    leftover tmp files of a killed run are removed (nobody writes while rank 0 decides).
    """
    job = json.loads(json.dumps(job))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    job_file = out / JOB
    if job_file.is_file():
        try:
            saved = json.loads(job_file.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{job_file} is not valid JSON: remove the folder {out} and run again") from None
        for key in sorted(set(saved) | set(job)):
            if saved.get(key) != job.get(key):
                raise UserError(
                    f"{out} holds {what} of another job ({key} is {saved.get(key)!r} there, {job.get(key)!r} here): "
                    "choose another output folder, or remove it"
                )
    elif any(p.name != LOCK for p in out.iterdir()):  # the run lock of this very command may be there
        raise UserError(f"output folder {out} is not empty and holds no {what}: choose another output folder")
    else:
        atomic_write_json(job_file, job)
    for leftover in out.glob("*.tmp*"):
        leftover.unlink()
    manifest = out / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None
