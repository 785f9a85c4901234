"""Training throughput: augmentation views/s, and FixMatch / MPL steps end to end against a plain
PyTorch FixMatch, all in one run.

    python benchmarks/train_throughput.py                    # CPU, every section (~15 min on 2 cores)
    python benchmarks/train_throughput.py --device cuda --steps 30
    python benchmarks/train_throughput.py --sections augment # views/s only (~1 min)
    PYTHONPATH=/tmp/augl python benchmarks/train_throughput.py --sections libraries   # with kornia / torchaug installed there

Sections:

* `augment`: weak and strong views per second at 8x8x1 (digits' settings) and 32x32x3 (CIFAR's:
  flip, RandAugment 2 ops at magnitude 10, cutout 0.5), for the per-sample reference path
  (torchvision v2 one sample at a time, as a DataLoader worker runs it) and the batched path
  (draws and plans as a worker makes them, applied to the batch). On CPU everything runs on one
  thread, so the figures are per core; with `--device cuda` the batched apply runs on the GPU and
  the worker's share (draw + plan) is given per core beside it.
* `fixmatch`, `mpl`: WRN-28-2, labeled batch 64 + 448 weak + 448 strong (MPL: the same batch, a
  teacher and a student), synthetic CIFAR-shaped images written as PNG shards and read through the
  real streams, trained by the real `Trainer` under each switch set. A run takes 2 x --steps steps:
  the first window warms up, the second is measured from the run's own logged `images_per_second`
  and `data_wait_fraction` (TensorBoard). Peak memory: the process's peak resident set (CPU) or
  `torch.cuda.max_memory_allocated` (GPU). Each run is a fresh process.
* `baseline`: FixMatch written the straightforward way, in this file: an in-memory uint8 dataset,
  per-sample torchvision v2 augmentation in DataLoader workers, fp32, eager, the same WRN-28-2,
  batch, optimizer and EMA, timed the same way. Ratios are unlabeled images/s against it.

Allocator: on CPU, glibc hands large freed buffers back to the kernel and a WRN step then spends
seconds re-faulting zeroed pages (ENVIRONMENT.md, engine/allocator.py). Every dist-ssl command asks
glibc for huge pages at start (the children here do the same); `train.cpu_allocator=retain` keeps
freed memory instead. The baseline runs as it comes (`default`), with huge pages, and with freed
memory kept (MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=64GiB): like for like with each of ours.

`libraries` (not in the default sections; kornia and torchaug are not dependencies): RandAugment
alone, ours against kornia's and torchaug's batch transforms.

MFU (GPU): FLOPs of one step counted by torch.utils.flop_counter (forward and backward), divided by
the step time and the device's dense bf16/fp32 peak (`--peak-tflops` overrides the table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RETAIN_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
HUGE_PAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
LABELED, MU = 64, 7
# Dense peak TFLOP/s by device name fragment: (bf16, fp32). H100/H200 SXM: 989 bf16, 67 fp32 (no TF32).
PEAKS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5)}

# (label, method, overrides): the switch sets measured for each method.
SWITCHES = {
    "fixmatch": [
        ("fp32 per-sample (before)", ["data.augment.path=per_sample"]),
        ("fp32 batched", ["data.augment.path=batched"]),
        ("fp32 batched channels_last", ["data.augment.path=batched", "train.channels_last=true"]),
        ("fp32 batched, train.cpu_allocator=retain", ["data.augment.path=batched", "train.cpu_allocator=retain"]),
        ("bf16 batched", ["data.augment.path=batched", "train.mixed_precision=bf16"]),
        ("bf16 batched channels_last", ["data.augment.path=batched", "train.mixed_precision=bf16", "train.channels_last=true"]),
    ],
    "mpl": [
        ("fp32 per-sample (before)", ["data.augment.path=per_sample"]),
        ("fp32 batched", ["data.augment.path=batched"]),
        ("bf16 batched", ["data.augment.path=batched", "train.mixed_precision=bf16"]),
    ],
}
COMPILE = ("fp32 batched compile", ["data.augment.path=batched", "train.compile=true"])


# ------------------------------------------------------------------------------------------------
# data


def synthetic_images(n: int, seed: int):
    """CIFAR-shaped uint8 images with CIFAR-like PNG sizes: smooth colour fields plus noise (pure
    noise would make PNG decoding unrealistically slow)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    fine = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    images = (fine * 200 + torch.rand(n, 3, 32, 32, generator=g) * 55).clamp(0, 255).to(torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images.permute(0, 2, 3, 1).numpy().copy(), labels.numpy().astype(np.int64)


def write_shards(root: Path) -> Path:
    from dist_ssl.data.shards.writer import write_dataset
    from dist_ssl.data.sources import Pool, Source

    out = root / "synthetic-cifar"
    if not (out / "test" / "manifest.json").is_file():
        train, train_labels = synthetic_images(6000, 0)
        test, test_labels = synthetic_images(256, 1)
        source = Source("synthetic-cifar", "image", [str(c) for c in range(10)], Pool.from_arrays("train", train, train_labels),
                        test=Pool.from_arrays("test", test, test_labels))
        write_dataset(source, out, labels_per_class=40, seed=0, maxcount=1000)
    return out


# ------------------------------------------------------------------------------------------------
# augmentation views/s


def time_per_sample(view, images, seeds) -> float:
    import torch

    generator = torch.default_generator
    started = time.perf_counter()
    outputs = []
    for image, seed in zip(images, seeds):
        generator.manual_seed(seed)
        outputs.append(view.per_sample(image))
    view.batch(torch.stack(outputs))
    return time.perf_counter() - started


def time_batched(view, images, seeds, device) -> tuple[float, float]:
    """(seconds of draw + plan on this CPU thread, seconds of apply on `device`)."""
    import torch

    from dist_ssl.data.device_views import to_device

    generator = torch.default_generator
    started = time.perf_counter()
    draws = []
    for seed in seeds:
        generator.manual_seed(seed)
        draws.append(view.draw())
    plan = view.plan(draws)
    worker = time.perf_counter() - started
    on_device, plan = images.to(device), to_device(plan, device)
    sync(device)
    started = time.perf_counter()
    view.apply(on_device, plan)
    sync(device)
    return worker, time.perf_counter() - started


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def augment_section(args) -> list[dict]:
    import torch

    from dist_ssl.config import AugmentConfig
    from dist_ssl.data.device_views import build_batched_views
    from dist_ssl.data.streams import mix
    from dist_ssl.data.transforms import build_views

    torch.set_num_threads(1)
    device = torch.device(args.device)
    rows = []
    settings = [("8x8x1 (digits)", (1, 8, 8), AugmentConfig(randaugment_magnitude=5)), ("32x32x3 (CIFAR)", (3, 32, 32), AugmentConfig(flip=True))]
    for label, shape, augment in settings:
        mean, std = [0.5] * shape[0], [0.25] * shape[0]
        reference = build_views("image", shape, mean, std, augment)
        batched = build_batched_views("image", shape, mean, std, augment)
        n = 448
        images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8)
        for name in ("weak", "strong"):
            per_sample, worker, applied = [], [], []
            for repeat in range(args.repeats + 1):  # the first round warms up
                seeds = [mix(repeat, i) for i in range(n)]
                t_ref = time_per_sample(reference[name], images, seeds)
                t_worker, t_apply = time_batched(batched[name], images, seeds, device)
                if repeat:
                    per_sample.append(t_ref)
                    worker.append(t_worker)
                    applied.append(t_apply)
            ref_rate = n / statistics.median(per_sample)
            if device.type == "cpu":
                batched_rate = n / statistics.median([w + a for w, a in zip(worker, applied)])
                rows.append({"images": label, "view": name, "per_sample_per_core": ref_rate, "batched_per_core": batched_rate,
                             "ratio": batched_rate / ref_rate})
            else:
                rows.append({"images": label, "view": name, "per_sample_per_core": ref_rate,
                             "batched_worker_per_core": n / statistics.median(worker), "batched_gpu_apply": n / statistics.median(applied)})
    big = 8192 if device.type == "cuda" else 0
    if big:  # a GPU wants big batches: the strong view of 8k CIFAR images at once
        _, shape, augment = settings[1]
        view = build_batched_views("image", shape, [0.5] * 3, [0.25] * 3, augment)["strong"]
        images = torch.randint(0, 256, (big, *shape), dtype=torch.uint8)
        times = [time_batched(view, images, [mix(r, i) for i in range(big)], device)[1] for r in range(args.repeats + 1)][1:]
        rows.append({"images": "32x32x3 (CIFAR) x 8192", "view": "strong", "batched_gpu_apply": big / statistics.median(times)})
    return rows


def libraries_section(args) -> list[dict]:
    """RandAugment(2, 10) on a CIFAR batch of 448 uint8 images, one thread: ours (each sample's own
    ops, torchvision's op per (op, sign) group) beside kornia's and torchaug's batch RandAugment,
    and whether each can apply parameters drawn elsewhere (the workers' per-sample draws)."""
    import torch

    from dist_ssl.config import AugmentConfig
    from dist_ssl.data.device_views import build_batched_views

    torch.set_num_threads(1)
    device = torch.device(args.device)
    n = 448
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    view = build_batched_views("image", (3, 32, 32), [0.5] * 3, [0.25] * 3, AugmentConfig(flip=True, crop_padding=0.0, cutout=0.0))["strong"]
    draws = []
    for i in range(n):
        torch.manual_seed(i)
        draws.append(view.draw())
    from dist_ssl.data.device_views import to_device

    plan = to_device(view.plan(draws), device)
    candidates = {"dist-ssl (per-sample ops, torchvision per group)": (lambda: view.apply(images, plan), "yes: the workers' draws")}
    try:
        import kornia.augmentation.auto as kornia_auto

        kornia_ra = kornia_auto.RandAugment(n=2, m=10).to(device)
        floats = images.float() / 255
        candidates["kornia 0.9 RandAugment (float input)"] = (lambda: kornia_ra(floats), "its own ParamItem lists only; the N ops are one choice per batch")
    except ImportError:
        pass
    try:
        import torchaug.transforms as torchaug_t

        torchaug_ra = torchaug_t.RandAugment(2, 10)
        candidates["torchaug 0.6 RandAugment"] = (lambda: torchaug_ra(images), "no: draws its own; one op set per batch")
    except ImportError:
        pass
    rows = []
    for name, (run, takes_params) in candidates.items():
        times = []
        for repeat in range(args.repeats + 1):
            sync(device)
            started = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - started)
        rows.append({"implementation": name, "views_per_second": n / statistics.median(times[1:]), "takes_given_parameters": takes_params})
    return rows


# ------------------------------------------------------------------------------------------------
# training steps, each in its own process


def run_child(kind: str, args, extra: list[str], env: dict) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--device", args.device, "--steps", str(args.steps),
               "--workers", str(args.workers), "--work", str(args.work), *(["--set", *extra] if extra else [])]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, **env, PYTHONUNBUFFERED="1"))
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise SystemExit(f"benchmark child {kind} {extra} failed:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_train(args) -> dict:
    """One of our runs: the real Trainer on the synthetic shards, measured from its own log."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_ssl.config import load_config
    from dist_ssl.engine.loop import Trainer

    method = args.child
    shards = write_shards(Path(args.work))
    out = Path(tempfile.mkdtemp(dir=args.work, prefix=f"{method}-"))
    steps = args.steps
    cfg = load_config(None, [
        f"method.name={method}", "model.name=wide_resnet28_2", f"data.shards={shards}", f"data.batch_size={LABELED}",
        f"data.unlabeled_batch_ratio={MU}", f"data.workers={args.workers}", "data.augment.flip=true", "data.eval_batch_size=256",
        "train.epochs=1", f"train.steps_per_epoch={2 * steps}", f"train.log_every_steps={steps}", "train.checkpoint_every_epochs=0",
        "train.ema_decay=0.999", f"train.output_dir={out}", *args.set,
    ])
    device = torch.device(args.device)
    trainer = Trainer(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    last = {tag: events.Scalars(f"train/{tag}")[-1].value for tag in ("images_per_second", "data_wait_fraction")}
    unlabeled_per_second = last["images_per_second"] * LABELED * MU / (LABELED * (1 + MU))
    result = {"unlabeled_per_second": unlabeled_per_second, "data_wait": last["data_wait_fraction"], "peak_mib": peak_memory_mib(device)}
    if device.type == "cuda":
        result["flops_per_step"] = step_flops(method, cfg, shards)
    return result


def step_flops(method: str, cfg, shards: Path) -> float:
    """Forward + backward FLOPs of one training step (MPL: both networks, its two student passes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dist_ssl.models import build_model

    net = build_model(cfg.model, 10, (3, 32, 32))
    batch = LABELED * (1 + 2 * MU)
    counter = FlopCounterMode(display=False)
    with counter:
        net(torch.randn(batch, 3, 32, 32)).sum().backward()
    one = counter.get_total_flops()
    # MPL: the teacher on [labeled, weak, strong], the student on [labeled, strong] and again on the labeled batch.
    return one * (1 + (LABELED * (1 + MU) + LABELED) / batch) if method == "mpl" else one


def child_baseline(args) -> dict:
    """FixMatch the straightforward way: per-sample v2 transforms in DataLoader workers, fp32, eager."""
    import torch
    import torch.nn.functional as F
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torch.utils.data import DataLoader, Dataset, RandomSampler
    from torchvision.transforms import v2

    from dist_ssl.config import ModelConfig
    from dist_ssl.models import build_model

    device = torch.device(args.device)
    images, labels = synthetic_images(6000, 0)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    shift = [v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()]
    weak = v2.Compose(shift + normalize)
    strong = v2.Compose(shift + [v2.RandAugment(2, 10), v2.RandomErasing(1.0, (0.0625, 0.25), (1.0, 1.0), [125, 122, 114])] + normalize)

    class Labeled(Dataset):
        def __len__(self):
            return 400

        def __getitem__(self, i):
            return weak(images[i]), int(labels[i])

    class Unlabeled(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return weak(images[i]), strong(images[i])

    def batches(dataset, size):
        sampler = RandomSampler(dataset, replacement=True, num_samples=10**8)
        return iter(DataLoader(dataset, size, sampler=sampler, num_workers=args.workers, drop_last=True,
                               pin_memory=device.type == "cuda", persistent_workers=args.workers > 0))

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="wide_resnet28_2"), 10, (3, 32, 32)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    labeled, unlabeled = batches(Labeled(), LABELED), batches(Unlabeled(), LABELED * MU)
    waited, marks = 0.0, []
    for step in range(2 * args.steps):
        if step == args.steps:
            sync(device)
            marks = [time.perf_counter(), waited]
        started = time.perf_counter()
        x, y = next(labeled)
        u_weak, u_strong = next(unlabeled)
        waited += time.perf_counter() - started
        x, y, u_weak, u_strong = (t.to(device, non_blocking=True) for t in (x, y, u_weak, u_strong))
        logits = model(torch.cat([x, u_weak, u_strong]))
        logits_x, logits_w, logits_s = logits[:LABELED], logits[LABELED:LABELED * (1 + MU)], logits[LABELED * (1 + MU):]
        confidence, pseudo = torch.softmax(logits_w.detach(), dim=1).max(dim=1)
        loss = F.cross_entropy(logits_x, y) + (F.cross_entropy(logits_s, pseudo, reduction="none") * (confidence >= 0.95)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
    sync(device)
    seconds = time.perf_counter() - marks[0]
    return {"unlabeled_per_second": args.steps * LABELED * MU / seconds, "data_wait": (waited - marks[1]) / seconds,
            "peak_mib": peak_memory_mib(device)}


def peak_tflops(args, mixed: bool) -> float | None:
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    for fragment, (bf16, fp32) in PEAKS.items():
        if fragment in name:
            return bf16 if mixed else fp32
    return None


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16); without it bf16 is emulated and
    far slower than fp32 (an AMD EPYC here: 7+ minutes for 3 WRN steps), so its rows are skipped."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def steps_section(args, env: dict) -> None:
    """Prints each row as its run ends (a run is minutes on CPU)."""
    baseline = None
    printed = False

    def emit(row: dict) -> None:
        nonlocal printed
        keys = ["method", "switches", "allocator", "unlabeled_per_second", "ratio", "data_wait", "peak_mib", "memory_ratio", "tflops", "mfu"]
        if not printed:
            print(" | ".join(keys))
            printed = True
        print(" | ".join(f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys), flush=True)

    skip_bf16 = args.device == "cpu" and not native_bf16()
    if skip_bf16:
        print("(this CPU has no native bf16: bf16 rows skipped)")
    if "baseline" in args.sections:
        # The straightforward implementation runs with the allocator as it comes; on CPU it is also
        # measured with ours, like for like.
        allocators = (("default", {}), ("huge pages", HUGE_PAGES), ("retain", RETAIN_MALLOC)) if args.device == "cpu" else (("default", {}),)
        for allocator, baseline_env in allocators:
            result = run_child("baseline", args, [], baseline_env)
            if baseline is None:
                baseline = result
            emit(dict(result, method="fixmatch", switches="plain PyTorch baseline (fp32, per-sample, eager)", allocator=allocator,
                      ratio=result["unlabeled_per_second"] / baseline["unlabeled_per_second"], memory_ratio=result["peak_mib"] / baseline["peak_mib"]))
    for method in ("fixmatch", "mpl"):
        if method not in args.sections:
            continue
        switches = SWITCHES[method] + ([COMPILE] if args.compile and method == "fixmatch" else [])
        for label, overrides in switches:
            if skip_bf16 and "bf16" in label:
                continue
            result = run_child(method, args, overrides, env)
            allocator = ("retain" if "retain" in label else "huge pages") if args.device == "cpu" else "cuda"
            row = dict(result, method=method, switches=label, allocator=allocator)
            if baseline and method == "fixmatch":
                row["ratio"] = result["unlabeled_per_second"] / baseline["unlabeled_per_second"]
                row["memory_ratio"] = result["peak_mib"] / baseline["peak_mib"]
            if "flops_per_step" in result:
                step_seconds = LABELED * MU / result["unlabeled_per_second"]
                peak = peak_tflops(args, "bf16" in label)
                row["tflops"] = result["flops_per_step"] / step_seconds / 1e12
                row["mfu"] = row["tflops"] / peak if peak else None
            emit(row)


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    if not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "flops_per_step"))
    print(" | ".join(keys))
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        print(" | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sections", default="augment,baseline,fixmatch,mpl")
    parser.add_argument("--steps", type=int, default=3, help="steps per window; a run takes two windows")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per stream (ours) and per loader (baseline)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure train.compile=true (minutes of compilation)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--work", default=None, help="folder for shards and runs (default: a temporary one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--set", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child != "baseline":  # what `dist-ssl train` does first
            from dist_ssl.engine.allocator import request_huge_pages

            request_huge_pages()
        result = child_baseline(args) if args.child == "baseline" else child_train(args)
        print(json.dumps(result))
        return
    args.sections = args.sections.split(",")
    args.work = args.work or tempfile.mkdtemp(prefix="dist-ssl-throughput-")
    env: dict = {}  # our children set their allocator as dist-ssl does (engine/allocator.py)
    import torch

    print(f"# train_throughput: device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{os.cpu_count()} CPU cores'}), "
          f"torch {torch.__version__}, workers {args.workers}, {args.steps}+{args.steps} steps per run")
    if "augment" in args.sections:
        print_rows("augmentation: views per second (448 images; CPU: one thread)", augment_section(args))
        sys.stdout.flush()
    if "libraries" in args.sections:
        print_rows("RandAugment(2, 10) implementations (448 CIFAR images; CPU: one thread)", libraries_section(args))
    if any(s in args.sections for s in ("baseline", "fixmatch", "mpl")):
        write_shards(Path(args.work))
        print("\n## steps: WRN-28-2, 64 labeled + 448 weak + 448 strong, synthetic CIFAR shards (ratios: against the first baseline row)")
        steps_section(args, env)


if __name__ == "__main__":
    main()
