"""S3 settings in one place: endpoint, retries, timeouts, the local read cache. Never credentials.

- Credentials come only from botocore's standard chain (environment, shared profile, IRSA web
  identity, instance metadata). Nothing here reads, passes or prints a key.
- The endpoint also comes from the standard AWS configuration: botocore >= 1.31 itself reads
  `AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL`, then `endpoint_url` in the profile, in every
  client s3fs creates (ours, Lightning's checkpoint I/O, DVC's remote). So MinIO, Ceph or a local
  moto server need no code change, only the environment:

      AWS_ENDPOINT_URL=http://127.0.0.1:5000 python -m pipeline prepare --set paths.root=s3://bucket/run

- Request checksums, too: botocore >= 1.36 adds CRC checksums to uploads, which some S3-compatible
  stores reject; `AWS_REQUEST_CHECKSUM_CALCULATION=when_required` and
  `AWS_RESPONSE_CHECKSUM_VALIDATION=when_required` (or the same keys in the profile) turn that off
  for every client (docs/s3.md). Nothing here passes them: botocore < 1.36 would refuse the keys.
- Transient errors (timeouts, 5xx, SlowDown/throttling) are retried by botocore with backoff:
  `AWS_MAX_ATTEMPTS` (default here 10, botocore's own is 5) and `AWS_RETRY_MODE` (default here
  `adaptive`: exponential backoff plus client-side rate limiting after throttling). s3fs adds
  its own retry loop for SlowDown and dropped connections on top.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec.config

DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_RETRY_MODE = "adaptive"


def client_config() -> dict[str, Any]:
    """botocore `Config` kwargs for every s3fs client: retries with backoff and bounded timeouts."""
    config: dict[str, Any] = {
        "retries": {
            "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS),
            "mode": os.environ.get("AWS_RETRY_MODE") or DEFAULT_RETRY_MODE,
        },
    }
    # botocore has no environment variables for these; the defaults (60 s) suit production.
    for name, env in (("connect_timeout", "PIPELINE_S3_CONNECT_TIMEOUT"), ("read_timeout", "PIPELINE_S3_READ_TIMEOUT")):
        if os.environ.get(env):
            config[name] = float(os.environ[env])
    return config


def configure() -> None:
    """Install our client config as fsspec's default for `s3`, under any the user set explicitly.

    fsspec applies `fsspec.config.conf["s3"]` to every S3FileSystem it creates, including the ones
    Lightning opens for checkpoints, so one call covers all S3 I/O in this process. Settings a
    user gave through fsspec's own config (FSSPEC_S3_* or its config files) win.
    """
    s3 = fsspec.config.conf.setdefault("s3", {})
    user = dict(s3.get("config_kwargs", {}))
    s3["config_kwargs"] = {**client_config(), **user}


def reset() -> None:
    """Re-read the environment and drop cached clients (tests change endpoints within one process)."""
    import s3fs

    fsspec.config.conf.get("s3", {}).pop("config_kwargs", None)
    configure()
    s3fs.S3FileSystem.clear_instance_cache()


def cache_dir() -> Path | None:
    """Where remote source images are cached, keyed by ETag: `PIPELINE_CACHE_DIR` or ~/.cache/pipeline.

    Set `PIPELINE_CACHE_DIR=off` to read the source from S3 every time.
    """
    configured = os.environ.get("PIPELINE_CACHE_DIR")
    if configured == "off":
        return None
    base = Path(configured) if configured else Path.home() / ".cache" / "pipeline"
    return base / "s3"


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/key -> ("bucket", "some/key")."""
    path = uri.split("://", 1)[-1]
    bucket, _, key = path.partition("/")
    return bucket, key
