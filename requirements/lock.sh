#!/bin/sh
# Regenerates requirements/image.lock, the hashed lock the Dockerfile installs.
# Run from the repository root, with uv on PATH (any throwaway venv: pip install uv==0.13.9):
#   sh requirements/lock.sh            # keep today's pins where still allowed
#   sh requirements/lock.sh --upgrade  # move every pin to the newest allowed version
set -eu
out=requirements/image.lock
cmd="uv pip compile pyproject.toml --python-version 3.12 --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple --generate-hashes --no-header"
tmp=$(mktemp)
trap 'rm -f "$tmp" "$out.new"' EXIT
{
  cat <<EOF
# requirements/image.lock: the container image's dependency closure, every package pinned
# with '==' and its sha256 hashes (the Dockerfile installs it with pip --require-hashes).
# Scope: pyproject.toml's [project] dependencies only (not the 'test' extra), resolved for the
# image's interpreter: CPython 3.12 on linux x86_64 glibc (python:3.12-slim-bookworm), from PyPI.
# torch==2.13.0 from PyPI is the CUDA 13 build: the nvidia-*/cuda-* wheels below carry the CUDA
# runtime, so GPU nodes need an NVIDIA driver >= 580. The project itself is not in here: the
# Dockerfile installs it with 'pip install --no-deps .' after copying the code.
# Do not edit by hand. Regenerate (repository root, uv 0.13.x on PATH):
#   sh requirements/lock.sh [--upgrade]
# which runs
#   $cmd
# and writes this header above uv's output.
EOF
  # shellcheck disable=SC2086  # $cmd is a word list on purpose
  UV_NO_CONFIG=1 $cmd "$@" --quiet --output-file "$tmp" && cat "$tmp"
} > "$out.new"
mv "$out.new" "$out"
echo "wrote $out: $(grep -c '^[a-z0-9]' "$out") pinned packages"
