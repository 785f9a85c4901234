#!/usr/bin/env bash
# Every GPU figure of the speed issue in one run, on a GPU machine without internet (< 8 minutes):
# the wheels and the Fashion-MNIST files travel with the checkout.
#
#   bash benchmarks/gpu_check.sh --prepare          # here, with internet: fill .whl/ and .data/ (git-ignored)
#   bash benchmarks/gpu_check.sh                    # there: install .whl/, train_throughput.py on cuda,
#                                                   #   a 2,000-step Fashion-MNIST FixMatch, every figure printed
#   bash benchmarks/gpu_check.sh --device cpu --smoke   # the same path on a CPU machine, in a few minutes
#
# What the GPU machine lacks (KINDS.md): webdataset and its braceexpand; torch, torchvision,
# accelerate, tensorboard, scikit-learn, pyyaml, tqdm and safetensors are there. dist_ssl itself
# runs from the checkout (PYTHONPATH), nothing else is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
smoke=0
prepare=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=${2:?--device needs cpu or cuda}; shift ;;
        --smoke) smoke=1 ;;
        --prepare) prepare=1 ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--prepare] [--device cuda|cpu] [--smoke]" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python3}
FMNIST_SYSTEM=/usr/share/datasets/fashion-mnist

if [ "$prepare" = 1 ]; then
    rm -rf .whl/gpu_check && mkdir -p .whl/gpu_check .data
    for pkg in webdataset==1.0.2 braceexpand==0.1.7; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux2014_x86_64 --platform any -d .whl/gpu_check "$pkg"
    done
    [ -d "$FMNIST_SYSTEM" ] || { echo "gpu_check: $FMNIST_SYSTEM missing (apt-get install dataset-fashion-mnist)" >&2; exit 2; }
    rm -rf .data/fashion-mnist && cp -r "$FMNIST_SYSTEM" .data/fashion-mnist
    du -sh .whl/gpu_check .data/fashion-mnist
    echo "carry: [\".whl\", \".data\"]"
    exit 0
fi

started=$(date +%s)
if ls .whl/gpu_check/*.whl >/dev/null 2>&1 && ! "$PY" -c "import webdataset" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/gpu_check/*.whl
    export PYTHONPATH=/tmp/gpu_check_site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PY" - <<'EOF'
import torch, torchvision, accelerate, webdataset
print(f"gpu_check: torch {torch.__version__}, torchvision {torchvision.__version__}, accelerate {accelerate.__version__}, "
      f"cuda {torch.cuda.is_available()} {torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")
EOF
work=$(mktemp -d /tmp/gpu_check.XXXXXX)
workers=$(( $(nproc) > 8 ? 6 : 1 ))

if [ "$smoke" = 1 ]; then
    throughput=(--sections augment,baseline,fixmatch --steps 1 --repeats 1)
    fm_steps=(train.epochs=1 train.steps_per_epoch=20)
else
    throughput=(--steps 20 --repeats 5)
    fm_steps=(train.epochs=4 train.steps_per_epoch=500)
fi
echo "== train_throughput.py on $device"
"$PY" benchmarks/train_throughput.py --device "$device" --workers "$workers" --work "$work" "${throughput[@]}"

fmnist=.data/fashion-mnist
[ -d "$fmnist" ] || fmnist=$FMNIST_SYSTEM
echo "== Fashion-MNIST FixMatch, 40 labels per class, ${fm_steps[*]}, on $device"
"$PY" -m dist_ssl shards write fashion-mnist --path "$fmnist" --out "$work/fmnist-40pc" --labels-per-class 40 --workers "$workers" >/dev/null
precision=bf16
run_started=$(date +%s)
"$PY" -m dist_ssl train configs/fashion_mnist/fixmatch.yaml data.shards="$work/fmnist-40pc" train.output_dir="$work/fmnist-fixmatch" \
    data.workers="$workers" train.mixed_precision=$precision train.eval_every_epochs=1 "${fm_steps[@]}"
"$PY" - "$work/fmnist-fixmatch/results.json" "$(( $(date +%s) - run_started ))" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"gpu_check: fashion-mnist fixmatch {r['steps']} steps: test accuracy {r['test_accuracy']:.4f} (best {r['best_test_accuracy']:.4f}), "
      f"{r['train_samples_per_second']:.0f} samples/s, data wait {r['data_wait_fraction']:.1%}, wall {sys.argv[2]} s")
EOF
echo "gpu_check: done in $(( $(date +%s) - started )) s"
