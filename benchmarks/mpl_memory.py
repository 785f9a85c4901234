"""Peak memory of one training step: SMPL against MPL (and FixMatch, one network, as a reference),
on the same model and batch, each in a fresh process, in one run.

    python benchmarks/mpl_memory.py                        # CPU: WRN-28-2, 32x32x3, 8 labeled + 2x56 unlabeled
    python benchmarks/mpl_memory.py --device cuda --batch-size 64   # GPU: torch.cuda.max_memory_allocated

What runs is the methods' own `train_step` with the engine's optimizers and `Stepper`, on random
images (memory does not depend on pixel values). Two warm-up steps allocate the optimizer states;
then one step is measured.

* CUDA: `max_memory_allocated()` during the measured step (after `reset_peak_memory_stats`), and
  `memory_allocated()` before it (weights, gradients' absence, optimizer states, EMA).
* CPU: the process's peak resident set during the step (Linux `VmHWM`, reset through
  `/proc/self/clear_refs` right before the step), and the resident set before it, both above the
  resident set after `import torch` (the interpreter and libraries, the same for every method).
  glibc runs with `MALLOC_MMAP_THRESHOLD_=65536` (fixed): every tensor of 64 KiB or more gets its
  own mapping, which is returned to the kernel when freed, so the resident set follows live tensors
  instead of keeping freed ones (the speed setting of ENVIRONMENT.md does the opposite, on purpose).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("mpl", "smpl", "fixmatch")
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def resident_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from dist_ssl.config import load_config, role_model
    from dist_ssl.engine.accelerator import make_accelerator
    from dist_ssl.engine.optim import Stepper, build_optimizer, build_scheduler
    from dist_ssl.methods import get_method
    from dist_ssl.methods.base import StepContext, TrainBatch
    from dist_ssl.models import build_model

    device = torch.device(args.device)
    after_import = resident_mib("VmRSS")
    cfg = load_config(None, [f"method.name={args.method}", f"model.name={args.model}", "model.dropout=0.2", "model.bn_momentum=0.001",
                             f"data.batch_size={args.batch_size}", f"data.unlabeled_batch_ratio={args.mu}", "train.ema_decay=0.995"])
    method_cls = get_method(args.method)
    shape = (3, args.image_size, args.image_size)
    torch.manual_seed(0)
    nets = {role: build_model(role_model(cfg, role), 10, shape).to(device) for role in method_cls.roles}
    specs = method_cls.optimizer_specs(cfg)
    optimizers = {name: build_optimizer(nets[spec.net], spec.optim) for name, spec in specs.items()}
    schedulers = {name: build_scheduler(optimizers[name], 100, spec.optim) for name, spec in specs.items()}
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(nets[method_cls.eval_role], multi_avg_fn=get_ema_multi_avg_fn(0.995), use_buffers=True)
    stepper = Stepper(make_accelerator(), nets, specs, optimizers, schedulers)
    method = method_cls(cfg, nets, 10)
    n_l, n_u = args.batch_size, args.batch_size * args.mu
    batch = TrainBatch(torch.randn(n_l, *shape, device=device), torch.randint(0, 10, (n_l,), device=device),
                       {view: torch.randn(n_u, *shape, device=device) for view in method_cls.unlabeled_views})

    def step(i: int) -> None:
        stepper.step = i
        method.train_step(batch, StepContext(i, 0.0, 100, stepper, stepper.reduce_sum))
        ema.update_parameters(nets[method_cls.eval_role])

    for i in range(args.warmup):
        step(i)
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        step(args.warmup)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        measure = "torch.cuda.max_memory_allocated"
    else:
        before = resident_mib("VmRSS") - after_import
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := VmRSS
        step(args.warmup)
        peak = resident_mib("VmHWM") - after_import
        measure = "peak resident set above `import torch`"
    seconds = time.perf_counter() - started
    parameters = sum(p.numel() for net in nets.values() for p in net.parameters())
    return {"method": args.method, "before_mib": before, "peak_mib": peak, "parameters": parameters, "step_seconds": seconds, "measure": measure}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="wide_resnet28_2")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="labeled images per step (unlabeled: mu times as many, two views)")
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.method = args.child
        print(json.dumps(child(args)))
        return 0
    rows = []
    for method in args.methods:
        command = [sys.executable, __file__, "--child", method, *sys.argv[1:]]
        env = dict(os.environ, **(MEASURE_ENV if args.device == "cpu" else {}))
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.model}, {args.image_size}x{args.image_size}, batch {args.batch_size} labeled + {args.batch_size * args.mu} unlabeled x 2 views, "
          f"device {args.device}; measure: {rows[0]['measure']}"
          + (f" (glibc {' '.join(f'{k}={v}' for k, v in MEASURE_ENV.items())})" if args.device == "cpu" else ""))
    reference = next((r for r in rows if r["method"] == "mpl"), rows[0])
    print(f"{'method':<10}{'networks':>9}{'before step MiB':>17}{'peak in step MiB':>18}{'peak / MPL':>12}{'step s':>8}")
    for row in rows:
        print(f"{row['method']:<10}{row['parameters'] / 1e6:>8.2f}M{row['before_mib']:>17.0f}{row['peak_mib']:>18.0f}"
              f"{row['peak_mib'] / reference['peak_mib']:>12.2f}{row['step_seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
