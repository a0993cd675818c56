"""A local S3 for tests: moto's server on 127.0.0.1 (random port), one fresh bucket per test.

Register with `pytest_plugins = ["tests.s3_fixtures"]` in a test module. The `s3` fixture
exports the standard AWS variables (dummy credentials, `AWS_ENDPOINT_URL`), so the code
under test, its subprocesses and DVC reach the server exactly as they would reach AWS.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, make_image_folder

# Unique per session: a test greps logs and outputs for it to prove it never leaks.
SECRET_KEY = f"pipeline-test-secret-{uuid.uuid4().hex}"
ACCESS_KEY = "pipeline-test-access-key"

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_MAX_ATTEMPTS": "6",  # enough for the fault tests; keeps a real outage short
    "AWS_RETRY_MODE": "standard",  # predictable backoff for timing in tests; production default is adaptive
    "AWS_EC2_METADATA_DISABLED": "true",  # no 1 s IMDS probe when a test removes the credentials
}
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@dataclass
class S3Env:
    endpoint: str
    bucket: str
    cache: Path

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    @property
    def fs(self):
        from pipeline import storage

        return storage.filesystem(f"s3://{self.bucket}")[0]

    def client(self):
        import boto3

        return boto3.client("s3")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, prefix: str = "") -> list[str]:
        self.fs.invalidate_cache()
        return sorted(p.split("/", 1)[1] for p in self.fs.find(f"{self.bucket}/{prefix}"))

    secret = SECRET_KEY

    def use_endpoint(self, monkeypatch, endpoint: str) -> None:
        """Point this process (and subprocesses started after) at `endpoint`, dropping cached clients."""
        use_endpoint(monkeypatch, endpoint)

    @staticmethod
    def assert_no_secret(*texts: str) -> None:
        for text in texts:
            assert SECRET_KEY not in text, "the AWS secret key leaked into output"

    def upload_image_folder(self, local: Path, prefix: str, classes: int = 3, per_class: int = 8) -> str:
        make_image_folder(local, classes=classes, per_class=per_class)
        target = self.uri(prefix)
        self.fs.put(str(local) + "/", target.removeprefix("s3://"), recursive=True)
        return target


def use_endpoint(monkeypatch, endpoint: str) -> None:
    """Point this process (and subprocesses started after) at `endpoint`, dropping cached clients."""
    from pipeline import s3

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3.reset()


@pytest.fixture
def s3(moto_endpoint, monkeypatch, tmp_path) -> S3Env:
    from pipeline import s3 as s3_settings

    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    cache = tmp_path / "s3-cache"
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(cache))
    use_endpoint(monkeypatch, moto_endpoint)
    env = S3Env(endpoint=moto_endpoint, bucket=f"test-{uuid.uuid4().hex[:12]}", cache=cache)
    env.create_bucket(env.bucket)
    yield env
    monkeypatch.undo()
    s3_settings.reset()
