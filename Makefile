# Flywheel: `make demo` brings the embedded stack up and walks an upload to a served prediction;
# `make test` runs every test. Both install what they need first (idempotent: seconds when warm).
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
# MinIO's community server ships as source only: built once, cached per pin.
MINIO_VERSION := v0.0.0-20260212201848-7aac2a2c5b7c

UV := .cache/uv/bin/uv
PLATFORM := .venv/platform
ML := .venv/ml
MINIO_PINNED := .cache/bin/minio-$(MINIO_VERSION)
FLYWHEEL := $(PLATFORM)/bin/flywheel

.PHONY: install system-packages lock demo up down status lint test test-unit test-compose bench clean

install: system-packages $(PLATFORM)/.installed $(ML)/.installed .cache/bin/minio

system-packages:
	@scripts/install-system-packages.sh

$(UV):
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target .cache/uv uv==$(UV_VERSION)

# Two environments from two lock files: Airflow's (orchestration, CLI, tests) and the ML one.
$(PLATFORM)/.installed: locks/platform.txt pyproject.toml | $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(PLATFORM)
	VIRTUAL_ENV=$(PLATFORM) $(UV) pip sync --quiet --compile-bytecode locks/platform.txt
	VIRTUAL_ENV=$(PLATFORM) $(UV) pip install --quiet --no-deps -e .
	touch $@

$(ML)/.installed: locks/ml.txt pyproject.toml | $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(ML)
	VIRTUAL_ENV=$(ML) $(UV) pip sync --quiet --compile-bytecode locks/ml.txt
	VIRTUAL_ENV=$(ML) $(UV) pip install --quiet --no-deps -e .
	touch $@

$(MINIO_PINNED):
	@command -v go >/dev/null || { echo "Go is needed to build MinIO (https://go.dev/dl)"; exit 1; }
	@echo "building MinIO $(MINIO_VERSION) (once; a few minutes)"
	GOBIN=$(CURDIR)/.cache/gobin CGO_ENABLED=0 go install github.com/minio/minio@$(MINIO_VERSION)
	mkdir -p .cache/bin && mv .cache/gobin/minio $@

.cache/bin/minio: $(MINIO_PINNED)
	ln -sf $(notdir $(MINIO_PINNED)) $@

# Lock files: regenerate after changing pyproject.toml's dependencies.
lock: | $(UV)
	$(UV) pip compile --quiet pyproject.toml --extra platform --python-version 3.11 -o locks/platform.txt
	$(UV) pip compile --quiet pyproject.toml --extra ml --python-version 3.11 -o locks/ml.txt

demo: install
	$(FLYWHEEL) demo

up: install
	$(FLYWHEEL) up

down:
	@if [ -x $(FLYWHEEL) ]; then $(FLYWHEEL) down; fi

status:
	$(FLYWHEEL) status

# ruff and import-linter, configured in pyproject.toml: lint, formatting and the layer contracts.
lint: $(PLATFORM)/.installed
	$(PLATFORM)/bin/ruff check .
	$(PLATFORM)/bin/ruff format --check .
	$(PLATFORM)/bin/lint-imports

test: install lint
	$(ML)/bin/python -m pytest tests/ml
	$(PLATFORM)/bin/python -m pytest tests --ignore=tests/ml --ignore=tests/compose

# Compose mode for real (tests/compose/run.sh): every image built, docker-compose.yml up, an upload
# served through its Nginx, a Celery worker's run. It uses the Docker engine DOCKER_HOST names, or
# starts a private one where none answers (root) and puts the host back afterwards; it fails, never
# skips, where neither works.
test-compose: install
	tests/compose/run.sh

test-unit: install
	$(PLATFORM)/bin/python -m pytest tests/unit

# Every benchmark, on the running stack (`make up` first); figures in docs/measurements.md.
bench: install
	$(PLATFORM)/bin/python bench/upload_to_serving.py --runs 3
	$(PLATFORM)/bin/python bench/replica_start.py
	$(PLATFORM)/bin/python bench/bento_tuning.py
	$(PLATFORM)/bin/python bench/serving.py
	$(PLATFORM)/bin/python bench/slow_clients.py
	$(PLATFORM)/bin/python bench/live_overhead.py
	$(PLATFORM)/bin/python bench/rollout_times.py
	$(ML)/bin/python bench/training_overhead.py --runs 3

clean: down
	rm -rf .flywheel
