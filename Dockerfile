# dist-ssl on a CUDA PyTorch base (torch and torchvision come from the base image).
#   docker build -t dist-ssl .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime -t dist-ssl .
#   docker run --gpus all -v $PWD/shards:/app/shards -v $PWD/runs:/app/runs dist-ssl \
#       accelerate launch --multi_gpu -m dist_ssl train configs/digits/fixmatch.yaml
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first, so code changes do not reinstall them. torch/torchvision already satisfy
# the loose floors in pyproject.toml and are kept from the base image.
COPY pyproject.toml README.md ./
RUN mkdir dist_ssl && touch dist_ssl/__init__.py && pip install -e . && rm -rf dist_ssl

COPY dist_ssl ./dist_ssl
COPY configs ./configs
COPY launch ./launch
# Editable install: the package stays in /app so `dist-ssl demo` finds /app/configs.
RUN pip install --no-deps -e . && dist-ssl --help >/dev/null

VOLUME ["/app/shards", "/app/runs"]
CMD ["dist-ssl", "--help"]
