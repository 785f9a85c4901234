# The two set-up commands on a fresh machine:
#   make demo   train supervised, pseudo_label and fixmatch on digits (2 processes) and print a table
#   make test   the test suite (what CI runs)
#   make docker-test   build the Dockerfile with podman and smoke-test the image (root; not in CI)
# Both create .venv on first use and reuse it afterwards.

VENV ?= .venv
PY := $(VENV)/bin/python
# torchvision's PyPI wheels are CUDA builds and fail to import against a CPU-only torch wheel
# (some machines keep one in pip's find-links). Asking for a recent torchvision makes pip take the
# registry's matching CUDA torch, which runs fine on CPU.
TORCH := "torchvision>=0.29"

.PHONY: demo test install clean docker-test

install: $(VENV)/.installed

# The deepspeed extra is in the default install so the test suite runs DeepSpeed for real (CPU
# accelerator, 1 process); EXTRAS=dev skips it on a machine that never launches DeepSpeed.
EXTRAS ?= dev,deepspeed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(TORCH)
	touch $@

demo: install
	$(VENV)/bin/dist-ssl demo --processes 2

# Two workers, a test file each at a time (module fixtures are built once), longest files first
# (tests/conftest.py): most tests launch real processes and wait on them.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

clean:
	rm -rf $(VENV) runs

# Not part of CI: needs root, podman, debootstrap, fuse-overlayfs and ~8 GB of disk; the local base
# image is built once (scripts/docker-test.sh).
docker-test:
	bash scripts/docker-test.sh
