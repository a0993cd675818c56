#!/usr/bin/env bash
# `make test`: the whole suite, with the image its Kubernetes pods run.
# The image build (minutes on a fresh machine, mostly downloads) runs while the venv is set up;
# the apt installs come first, one at a time (apt holds a lock). Then pytest, once both are ready.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${IMAGE:-localhost/pipeline:dev}
bash scripts/ensure-chromium.sh
bash scripts/build-image.sh --tools
log=$(mktemp /tmp/image-build.XXXXXX.log)
bash scripts/build-image.sh "$image" >"$log" 2>&1 &
build=$!
make setup
if ! wait "$build"; then
  tail -n 40 "$log" >&2
  echo "make test: the image build failed (log: $log)" >&2
  exit 1
fi
tail -n 1 "$log"
# Two pytest-xdist workers (PYTEST_WORKERS; 0 runs in this process): half the suite's time is spent waiting
# on servers, pods and subprocesses, and a third worker on two cores only makes each test slower. Tests go
# out one at a time, slow ones first (tests/conftest.py): xdist's default hands each worker a block of
# consecutive tests, which gave one worker every slow test.
# PYTEST_ARGS is a word list on purpose (e.g. "-x tests/unit").
# shellcheck disable=SC2086
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --maxschedchunk 1 ${PYTEST_ARGS:-}
