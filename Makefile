# The README's commands. Every install step lives here, so a fresh clone needs only
# Python >= 3.10 and make. The virtualenv is .venv/ at the repo root, made when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
# Where DVC pushes data and the run-cache: outside the repo, so every clone on this machine shares it.
DVC_REMOTE ?= $(HOME)/.cache/pipeline/dvc-remote
export PATH := $(BIN):$(PATH)
export PREFECT_HOME ?= $(abspath .prefect)
# The embedded server's telemetry heartbeat only adds "database is locked" noise to SQLite.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup run test test-fast ui bench bench-data lint clean image
# The image tests and the stand-in cluster's pods run (`make image`; docs/image.md).
IMAGE ?= localhost/pipeline:dev

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

.dvc/config.local: | $(VENV)/.installed
	$(BIN)/dvc remote add --local --force --default shared $(DVC_REMOTE)

setup: $(VENV)/.installed .dvc/config.local

run: setup  ## the whole pipeline on the embedded defaults (local processes, CPU, ephemeral Prefect); S3=1: all on a local S3
ifeq ($(S3),1)
	$(BIN)/python scripts/s3_demo.py $(ARGS)
else
	$(BIN)/pipeline run $(ARGS)
endif

test:  ## the whole test suite: sets up .venv and builds the image its Kubernetes pods run, side by side (scripts/test.sh)
	IMAGE=$(IMAGE) PYTEST_ARGS="$(PYTEST_ARGS)" bash scripts/test.sh

test-fast: setup image  ## the fast tier: every test not marked slow (unit tests, launcher and kubectl on the stand-in)
	$(BIN)/python -m pytest -n $${PYTEST_WORKERS:-2} --maxschedchunk 1 -m "not slow" $(PYTEST_ARGS)

ui: setup  ## Prefect server + UI on http://127.0.0.1:$${PIPELINE_UI_PORT:-4200} serving the train/retrain deployments; a taken port is exit 2
	$(BIN)/python -m flows.serve

bench: setup  ## CPU benchmarks; prints each measured ratio
	$(BIN)/python -m bench.cpu

bench-data: setup  ## data benchmarks: prepare, loader, memory; prints each measured ratio
	$(BIN)/python -m bench.data

image:  ## builds the Dockerfile with buildah as IMAGE (default localhost/pipeline:dev); root, no daemon
	bash scripts/build-image.sh $(IMAGE)

lint: setup
	$(BIN)/hadolint Dockerfile

clean:
	rm -rf data/prepared models reports checkpoints runs .prefect
