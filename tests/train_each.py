"""`dist-ssl train` of several configs one after another in one process group, so that one
`accelerate launch` compares several methods (as the pipeline runs its stages):

    accelerate launch ... tests/train_each.py OUT_ROOT CONFIG [CONFIG ...] -- key=value ...

Each CONFIG trains into OUT_ROOT/<its file name without .yaml>, with the shared overrides.
"""

import sys
from pathlib import Path

from dist_ssl.cli import exit_process, leave_process_group
from dist_ssl.config import load_config
from dist_ssl.engine.loop import train

if __name__ == "__main__":
    split = sys.argv.index("--")
    root, configs, overrides = Path(sys.argv[1]), sys.argv[2:split], sys.argv[split + 1 :]
    finished = False
    try:
        for config in configs:
            train(load_config(config, [*overrides, f"train.output_dir={root / Path(config).stem}"]))
        finished = True
    finally:
        leave_process_group(finished)
    exit_process(0)  # as `dist-ssl` ends: see its docstring
