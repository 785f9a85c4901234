"""`dist-ssl train` in which one rank SIGKILLs itself halfway through writing its file of checkpoint
step-STEP: the real training and commit code, with a process dying at the worst moment.

    accelerate launch ... tests/engine/dies_mid_write.py STEP RANK train CONFIG key=value ...
"""

import io
import os
import signal
import sys

import torch

from dist_ssl import cli
from dist_ssl.engine import checkpoint

STEP, RANK = int(sys.argv[1]), int(sys.argv[2])
write_whole = checkpoint.atomic_torch_save


def write_half_then_die(obj, path):
    if path.parent.name == f"step-{STEP}" and path.name == f"rank-{RANK:05d}.pt":
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        with open(path.with_name(path.name + ".tmp"), "wb") as handle:
            handle.write(buffer.getvalue()[: buffer.tell() // 2])
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    write_whole(obj, path)


checkpoint.atomic_torch_save = write_half_then_die
cli.main(sys.argv[3:])
