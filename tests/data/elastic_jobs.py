"""Training runs one after another in one process group, each logging every global step's batch
(tests/data/test_elastic.py): one `accelerate launch` (or a plain `python`, for one process) serves
several runs, so the layouts of the elastic tests cost one start each.

    accelerate launch ... tests/data/elastic_jobs.py JOBS.json

JOBS.json is a list of {"config": ..., "overrides": [...]}; each run writes OUTPUT_DIR/steps.jsonl
from rank 0: per global step, a hash of the labeled batch (keys and labeled view) and of the
unlabeled batch (keys and strong view), joined over the ranks in rank order, and the step's loss
averaged over the ranks (their shares are equal, so that is the global batch's loss).
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dist_ssl.cli import exit_process, leave_process_group
from dist_ssl.config import load_config
from dist_ssl.engine import loop


def _gathered(value):
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _digest(batch: dict, view: torch.Tensor) -> str:
    """The batch's share as bytes, per sample: its key and its view, so shares joined in rank order
    hash the same as the global batch read by one process."""
    rows = view.detach().cpu().contiguous()
    return b"".join(key.encode() + b"\0" + rows[i].numpy().tobytes() for i, key in enumerate(batch["keys"]))


def logging_step(original):
    def train_step(self, step, labeled, unlabeled):
        parts = {"labeled": _digest(labeled, self._views(labeled)[self.method_cls.labeled_view])}
        if unlabeled is not None:
            parts["unlabeled"] = _digest(unlabeled, self._views(unlabeled)["strong"])
        out = original(self, step, labeled, unlabeled)
        shares = _gathered((parts, float(out.metrics["loss"])))
        if self.rank == 0:
            row = {"step": step + 1, "loss": sum(loss for _, loss in shares) / len(shares)}
            for name in parts:
                row[name] = hashlib.sha256(b"".join(share[name] for share, _ in shares)).hexdigest()
            with open(Path(self.cfg.train.output_dir) / "steps.jsonl", "a") as log:
                log.write(json.dumps(row) + "\n")
        return out

    return train_step


if __name__ == "__main__":
    loop.Trainer.train_step = logging_step(loop.Trainer.train_step)
    finished = False
    try:
        for job in json.loads(Path(sys.argv[1]).read_text()):
            loop.train(load_config(job["config"], job["overrides"]))
        finished = True
    finally:
        leave_process_group(finished)
    exit_process(0)  # as `dist-ssl` ends: see its docstring
