"""Creating the Accelerator the same way for training, evaluation and inference."""

from __future__ import annotations

import os

import torch

from dist_ssl.errors import UserError


def _on_cpu() -> bool:
    cpu = not torch.cuda.is_available()
    if cpu:  # accelerate imports DeepSpeed when installed; spare its "no GPU detected" warning on CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return cpu


def make_accelerator(mixed_precision: str = "no"):
    from accelerate import Accelerator

    cpu = _on_cpu()
    if cpu and mixed_precision == "fp16":
        raise UserError("mixed precision fp16 needs a GPU; use bf16 or no on CPU")
    # accelerate only forms a gloo group over CPU processes when told it runs on CPU.
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def process_state():
    """accelerate's process control alone (rank, world, device, barriers), for work that trains
    nothing. Unlike an Accelerator it fixes no mixed-precision setting, so a pipeline can run it
    between training stages whatever their `train.mixed_precision`."""
    from accelerate import PartialState

    return PartialState(cpu=_on_cpu())
