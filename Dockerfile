# One image for every stage and for Prefect flow runs. Build: docker build -t REGISTRY/pipeline:TAG .
# No CUDA base image: torch==2.13.0 from PyPI is the CUDA 13 build and its nvidia-*/cuda-* wheels
# (pinned in requirements/image.lock) carry the CUDA runtime, so GPU nodes need NVIDIA driver >= 580;
# the same image runs on CPU-only nodes.
# checkov:skip=CKV_DOCKER_2: batch image; Kubernetes ignores HEALTHCHECK and Job status is the health signal
# checkov:skip=CKV_DOCKER_7: FROM ${BASE_IMAGE}: its default (the ARG below) is pinned by digest (tests/unit/test_dockerfile.py)

# Base: python:3.12-slim-bookworm (3.12.15), pinned by its multi-platform index digest so a re-pushed
# tag cannot change Python or Debian under us. Both stages use the same base (the venv's python links
# to /usr/local/bin/python3.12). Refresh deliberately, in its own commit:
#   docker buildx imagetools inspect python:3.12-slim-bookworm   # "Digest:" line, then replace it below
# BASE_IMAGE is an argument only so that machines without a registry can name a local substitute
# (scripts/image-base.sh, used by `make image`); every other build takes this digest.
ARG BASE_IMAGE=python:3.12-slim-bookworm@sha256:54c85f3c47607a77f32adec749d3c81d1348bf25833671f512b26a9b6d778cb3

# --- builder: the dependency venv, from the hashed lock only --------------------------------------
FROM ${BASE_IMAGE} AS builder
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv "$VIRTUAL_ENV"
# Only the lock is copied here, so this multi-GB layer is rebuilt when the lock changes, never
# for a code change. Regenerate the lock with: sh requirements/lock.sh
# All wheels except antlr4-python3-runtime (pure-Python sdist, built here with setuptools).
COPY requirements/image.lock /tmp/image.lock
# PIP_CERT: a CA bundle path for builds behind a TLS-intercepting proxy, mounted for the build only
# (`make image` passes the host's); empty by default. The cache mount keeps downloaded wheels between
# builds on one machine (the lock's hashes still check every one); nothing of it lands in the image.
ARG PIP_CERT=""
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    pip install --require-hashes ${PIP_CERT:+--cert "$PIP_CERT"} --requirement /tmp/image.lock

# --- final: slim runtime, venv + code, non-root --------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp

# Non-root with a fixed UID, matching runAsUser in the Job manifests and k8s/.
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid app --no-create-home --home-dir /tmp --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# The flow reads the stage graph from dvc.yaml and makes per-run DVC workspaces from these.
COPY --chown=10001:10001 params.yaml dvc.yaml .dvcignore ./
COPY --chown=10001:10001 .dvc/config .dvc/config
# Code last: a code change rebuilds only these small layers. The dependencies are already in the
# venv, so --no-deps; --no-build-isolation builds with the locked setuptools (no download).
COPY --chown=10001:10001 pyproject.toml ./
COPY --chown=10001:10001 pipeline/ pipeline/
COPY --chown=10001:10001 flows/ flows/
# Flow runs write runs/<name>/ and DVC writes .dvc/tmp and .dvc/cache under /app: owned by the app user.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && rm -rf build ./*.egg-info \
 && mkdir -p runs \
 && chown 10001:10001 /app /app/.dvc /app/runs
USER 10001:10001

# No ENTRYPOINT: Prefect's Kubernetes worker sets only args (prefect flow-run execute) and the stage
# launcher sets command ["python", "-m", "pipeline"] + args; both replace this CMD.
CMD ["pipeline", "--help"]
