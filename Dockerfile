# One image for every stage: `python -m pipeline <stage>`. CUDA runtime base so the same
# image drives GPUs on Kubernetes and CPUs anywhere. Build: docker build -t REGISTRY/pipeline:TAG .
# checkov:skip=CKV_DOCKER_2: batch image; Kubernetes ignores HEALTHCHECK and Job status is the health signal
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# Python from the distro (3.10, within requires-python); pinned for reproducible layers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3=3.10.6-1~22.04.1 python3-venv=3.10.6-1~22.04.1 ca-certificates=20240203~22.04.1 \
 && rm -rf /var/lib/apt/lists/*

# A venv keeps pip away from the distro's Python packages; PATH makes `python` this one.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
RUN python3 -m venv "$VIRTUAL_ENV"

WORKDIR /app
COPY pyproject.toml ./
COPY pipeline/ pipeline/
COPY flows/ flows/
RUN pip install --no-cache-dir .
# The flow reads the stage graph from dvc.yaml and makes per-run DVC workspaces from these.
COPY params.yaml dvc.yaml .dvcignore ./
COPY .dvc/config .dvc/config

# Non-root with a fixed UID, matching runAsUser in the Job manifests and k8s/.
RUN groupadd --gid 10001 app && useradd --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app \
 && chown -R app:app /app
USER 10001:10001

ENTRYPOINT ["python", "-m", "pipeline"]
CMD ["--help"]
