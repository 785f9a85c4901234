"""Pseudo-labels per second: `dist-ssl pseudo-label`'s inference against a plain single-process fp32
loop over the same shards, in one run, as ratios to that loop.

    # CPU (Fashion-MNIST, small_cnn): the figures in docs/pseudo-labels.md
    python benchmarks/pseudo_label_throughput.py
    # GPU (ResNet-50 at 224 px on synthetic JPEG shards; --processes N for N GPUs)
    python benchmarks/pseudo_label_throughput.py --source synthetic --image-size 224 --model resnet50 \
        --samples 20000 --batch-size 256 --workers 8 --processes 1

The plain loop is what one writes first: for each shard, decode each sample, normalize it on its
own, stack a batch, run the fp32 model under no_grad, take the top-P on the CPU. dist-ssl's
variants run `label_pool` (the code behind `dist-ssl pseudo-label`): DataLoader workers decode
while the model runs, uint8 batches are normalized on the device, bf16 autocast and channels-last
on GPUs, results stay on the device until a shard is done, one process per GPU under
`accelerate launch`. Its time includes writing the prediction files and the rank-0 check.

Every variant runs in a fresh process with the same environment: one warm-up pass over the first
shard, then one timed pass over the whole pool. The variants take turns, `--repeats` rounds of
all of them, and each reports its median, so a machine whose load drifts (others run tests on it)
weighs on every variant alike. The weights are
random (seeded): throughput does not depend on them, and the top-1 agreement with the plain loop
is printed as a check that both computed the same thing. On CPU the glibc allocator setting of
ENVIRONMENT.md (`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`) is applied to every
variant unless --system-malloc is given.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


# ----------------------------------------------------------------------------------------------
# the pool


def write_pool(out: Path, items, count: int, shards: int, header: dict) -> None:
    from dist_ssl.data.shards.manifest import FORMAT
    from dist_ssl.data.shards.writer import write_split

    header = dict(header, format=FORMAT, protocol={"benchmark": True})
    write_split(items, out, "unlabeled", -(-count // shards), header)


def fashion_mnist_pool(out: Path, samples: int, shards: int) -> None:
    from dist_ssl.data.sources import load_source

    source = load_source("fashion-mnist")
    count = min(samples, source.train.size)
    items = ((f"train-{i:08d}", source.train.read(i), None, int(source.train.labels[i])) for i in range(count))
    write_pool(out, items, count, shards, {"source": "fashion-mnist", "num_classes": 10, "class_names": source.class_names,
                                          "input": {"kind": "image", "encoding": "png", "shape": [28, 28, 1]},
                                          "mean": [0.286], "std": [0.353]})


def synthetic_pool(out: Path, samples: int, shards: int, size: int, classes: int) -> None:
    """Smooth random RGB images as JPEG (quality 90), the encoding of real web-scale pools."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def items():
        for i in range(samples):
            low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            yield f"synthetic-{i:09d}", np.asarray(low.resize((size, size), Image.BILINEAR)), None, int(rng.integers(classes))

    write_pool(out, items(), samples, shards, {"source": "synthetic", "num_classes": classes, "class_names": [str(c) for c in range(classes)],
                                              "input": {"kind": "image", "encoding": "jpg", "quality": 90, "shape": [size, size, 3]},
                                              "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})


# ----------------------------------------------------------------------------------------------
# one variant, in its own process


def build_net(name: str, manifest):
    import torch

    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None, num_classes=manifest.num_classes)
    from dist_ssl.config import ModelConfig
    from dist_ssl.models import build_model

    return build_model(ModelConfig(name=name), manifest.num_classes, manifest.input_shape)


def first_shard(manifest):
    from dist_ssl.data.shards.manifest import Manifest

    return Manifest(manifest.root, dict(manifest.data, shards=manifest.data["shards"][:1], num_samples=manifest.shards[0].num_samples))


def plain_loop(net, manifest, view, device, batch_size: int, top_p: int) -> tuple[int, dict]:
    """The loop one writes first: per-sample decode and normalization, fp32, no workers."""
    import torch

    from dist_ssl.data.shards.codec import decode_sample
    from dist_ssl.data.shards.tar import raw_samples

    channels = manifest.shape[-1]
    top1 = {}
    count = 0

    def run(inputs, keys):
        with torch.no_grad():
            probs = torch.softmax(net(torch.stack(inputs).to(device)), dim=1)
            classes = probs.topk(top_p, dim=1).indices.cpu()
        top1.update(zip(keys, classes[:, 0].tolist()))

    for shard in manifest.shards:
        inputs, keys = [], []
        for raw in raw_samples(manifest.url(shard)):
            sample = decode_sample(raw, channels)
            inputs.append(view(sample["input"]))
            keys.append(sample["key"])
            count += 1
            if len(inputs) == batch_size:
                run(inputs, keys)
                inputs, keys = [], []
        if inputs:
            run(inputs, keys)
    return count, top1


def ours(net, manifest, view, out: Path, args) -> tuple[int, dict]:
    from dist_ssl.config import InferenceConfig
    from dist_ssl.inference.pseudo_label import label_pool, read_predictions

    cfg = InferenceConfig(top_p=args.top_p, batch_size=args.batch_size, workers=args.workers, precision=args.precision)
    result = label_pool(net, manifest, view, out, {"checkpoint": f"benchmark:{args.model}"}, cfg)
    top1 = {}
    if args.check:
        for entry in result["shards"]:
            preds = read_predictions(out / entry["file"])
            top1.update(zip((k.decode() for k in preds.keys), preds.classes[:, 0].tolist()))
    return result["num_samples"], top1


def worker(args) -> None:
    import contextlib

    import torch

    from dist_ssl.config import AugmentConfig
    from dist_ssl.data.shards.manifest import load_manifest
    from dist_ssl.data.transforms import build_views
    from dist_ssl.engine.accelerator import process_state

    state = process_state()
    manifest = load_manifest(args.pool)
    view = build_views(manifest.kind, manifest.input_shape, manifest.data["mean"], manifest.data["std"], AugmentConfig())["plain"]
    net = build_net(args.model, manifest).eval()
    device = state.device
    if args.variant == "plain":
        net = net.to(device)
    scratch = Path(args.scratch)
    times, top1 = [], {}
    for attempt in range(2):  # attempt 0: warm-up on the first shard
        pool = first_shard(manifest) if attempt == 0 else manifest
        state.wait_for_everyone()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            if args.variant == "plain":
                count, top1 = plain_loop(net, pool, view, device, args.batch_size, args.top_p)
            else:
                count, top1 = ours(net, pool, view, scratch / f"run-{attempt}", args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        state.wait_for_everyone()
        if attempt:
            times.append(time.perf_counter() - started)
    if state.is_main_process:
        Path(args.result).write_text(json.dumps({"samples": count, "seconds": times, "top1": top1 if args.check else {}}))


# ----------------------------------------------------------------------------------------------
# the run


def launch(args, variant: str, processes: int, pool: Path, scratch: Path, env: dict, round_: int) -> dict:
    name = f"{variant}-{processes}-{round_}"
    result = scratch / f"{name}.json"
    own = ["--worker", "--variant", variant, "--pool", str(pool), "--scratch", str(scratch / name),
           "--result", str(result), "--model", args.model, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--top-p", str(args.top_p), "--precision", args.precision] + ([] if args.check else ["--no-check"])
    if processes == 1:
        command = [sys.executable, __file__, *own]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--num_processes",
                   str(processes), "--mixed_precision", "no", "--dynamo_backend", "no", __file__, *own]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{variant} on {processes} process(es) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("fashion-mnist", "synthetic"), default="fashion-mnist")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224, help="synthetic only")
    parser.add_argument("--classes", type=int, default=1000, help="synthetic only")
    parser.add_argument("--model", default="small_cnn", help="a dist-ssl model name, or resnet50 (torchvision)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="dist-ssl's decoding workers per process")
    parser.add_argument("--processes", default="1,2", help="dist-ssl process counts to measure, e.g. 1,2 (GPUs: one per GPU)")
    parser.add_argument("--top-p", type=int, default=10)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--repeats", type=int, default=3, help="rounds; every variant runs once per round")
    parser.add_argument("--pool-dir", help="reuse or create the pool here (default: a temporary folder)")
    parser.add_argument("--system-malloc", action="store_true", help="leave glibc's allocator settings alone")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the top-1 agreement check")
    # internal: one variant in its own process
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--variant", "--pool", "--scratch", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.worker:
        return worker(args)

    import torch

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    if not args.system_malloc:
        env.update(ALLOCATOR)
    with tempfile.TemporaryDirectory(prefix="pl-bench-") as tmp:
        pool = Path(args.pool_dir) if args.pool_dir else Path(tmp) / "pool"
        if not (pool / "manifest.json").is_file():
            started = time.time()
            if args.source == "fashion-mnist":
                fashion_mnist_pool(pool, args.samples, args.shards)
            else:
                synthetic_pool(pool, args.samples, args.shards, args.image_size, args.classes)
            print(f"wrote the pool in {time.time() - started:.0f} s: {pool}", flush=True)
        manifest = json.loads((pool / "manifest.json").read_text())
        device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s))" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
        allocator = "system default" if args.system_malloc else " ".join(f"{k}={v}" for k, v in ALLOCATOR.items())
        print(f"pool: {manifest['source']}, {manifest['num_samples']} images {tuple(manifest['input']['shape'])} "
              f"({manifest['input']['encoding']}) in {len(manifest['shards'])} shards; model {args.model}; batch {args.batch_size}; "
              f"top-{args.top_p}; device {device}; torch {torch.__version__}; allocator: {allocator}; "
              f"median of {args.repeats} rounds, each variant warmed up in its own process", flush=True)
        scratch = Path(tmp) / "scratch"
        scratch.mkdir()
        variants = [("plain loop: 1 process, fp32, no workers", "plain", 1)] + [
            (f"dist-ssl: {n} process(es) x {args.workers} workers, precision {args.precision}", "ours", n)
            for n in (int(p) for p in args.processes.split(","))
        ]
        runs: dict[str, dict] = {}
        for round_ in range(args.repeats):
            for label, variant, processes in variants:
                result = launch(args, variant, processes, pool, scratch, env, round_)
                kept = runs.setdefault(label, dict(result, seconds=[]))
                kept["seconds"] += result["seconds"]
        rows = list(runs.items())
        baseline = rows[0][1]
        base_rate = baseline["samples"] / statistics.median(baseline["seconds"])
        print(f"{'variant':<58}{'labels/s':>10}{'ratio':>8}{'top-1 agree':>13}")
        for label, result in rows:
            rate = result["samples"] / statistics.median(result["seconds"])
            agree = ""
            if args.check and result["top1"]:
                same = sum(result["top1"][k] == v for k, v in baseline["top1"].items())
                agree = f"{same / len(baseline['top1']) * 100:.2f}%"
            passes = ", ".join(f"{result['samples'] / seconds:.0f}" for seconds in result["seconds"])
            print(f"{label:<58}{rate:>10.0f}{rate / base_rate:>8.2f}{agree:>13}  (passes: {passes})", flush=True)


if __name__ == "__main__":
    main()
