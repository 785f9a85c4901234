# dist-ssl on a PyTorch base image: torch and torchvision come from the base, the rest of the
# dependencies go into a venv that sees the base's packages.
#   docker build -t dist-ssl .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime -t dist-ssl .
#   docker run --rm -v $PWD/shards:/app/shards dist-ssl shards write digits --out /app/shards/digits-5pc --labels-per-class 5
#   docker run --rm --gpus all --shm-size=8g -v $PWD/shards:/app/shards -v $PWD/runs:/app/runs dist-ssl \
#       train configs/digits/fixmatch.yaml data.shards=/app/shards/digits-5pc train.output_dir=/app/runs/fixmatch
# The entrypoint is `dist-ssl`: arguments are its verbs. Several GPUs:
#   docker run --rm --gpus all --shm-size=8g ... --entrypoint accelerate dist-ssl launch --multi_gpu -m dist_ssl train CONFIG ...
# Training needs --shm-size (or --ipc=host): DataLoader workers pass batches through /dev/shm, which a
# container gets at 64 MB by default (docs/where-it-runs.md#docker).
# `make docker-test` builds and smoke-tests it with podman from a local Debian base (scripts/docker-test.sh).
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}
# A CA bundle for pip during the build only (a proxy's, say); ARGs are not kept in the image.
ARG PIP_CERT

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/dist-ssl \
    PATH=/opt/dist-ssl/bin:$PATH
WORKDIR /app

# Dependencies first, so code changes do not reinstall them. A venv rather than
# --break-system-packages: a PEP 668 base (Debian, Ubuntu 23.04+) refuses pip in its own Python, and
# --system-site-packages keeps the base's torch/torchvision, which satisfy pyproject's loose floors.
COPY pyproject.toml README.md ./
RUN python3 -m venv --system-site-packages /opt/dist-ssl \
 && mkdir dist_ssl && touch dist_ssl/__init__.py && pip install -q -e . && rm -rf dist_ssl

# .dockerignore lets only the package, configs, launch files and pyproject/README in.
COPY . .
# Editable install: the package stays in /app so `dist-ssl demo` finds /app/configs. The user owns
# only what a run writes: the mounted runs and shards folders (and its home: matplotlib's cache).
RUN pip install -q --no-deps -e . \
 && useradd --create-home --uid 1000 dist-ssl \
 && mkdir -p /app/runs /app/shards && chown dist-ssl:dist-ssl /app/runs /app/shards \
 && dist-ssl --help > /dev/null
USER dist-ssl

VOLUME ["/app/shards", "/app/runs"]
ENTRYPOINT ["dist-ssl"]
CMD ["--help"]
