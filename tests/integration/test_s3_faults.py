"""S3 faults against a local moto server: transient errors are retried, permission and
missing-bucket/key errors exit 2 at once naming what is wrong, and a crash mid-upload never
makes a half output visible (the previous complete output stays readable)."""
from __future__ import annotations

import contextlib

import pytest

from pipeline import storage
from pipeline.errors import DataError
from tests.conftest import PARAMS, TINY, sets, subprocess_env
from tests.s3_faults import FaultProxy

pytest_plugins = ["tests.s3_fixtures"]


@pytest.fixture
def proxy(s3, monkeypatch):
    with FaultProxy(s3.endpoint) as fault_proxy:
        s3.use_endpoint(monkeypatch, fault_proxy.url)
        yield fault_proxy


def _publish(uri: str, files: dict[str, bytes]) -> None:
    with storage.staged_output(uri) as out:
        for name, data in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)


# ---------------------------------------------------------------- transient errors


def test_slowdown_and_5xx_are_retried_with_backoff(s3, proxy):
    uri = s3.uri("out", "metrics.json")
    proxy.fail(2, status=503, code="SlowDown")
    storage.write_json(uri, {"ok": 1})
    proxy.fail(2, status=500, code="InternalError")
    assert storage.read_json(uri) == {"ok": 1}
    proxy.fail(1, status=503, code="ServiceUnavailable")
    _publish(s3.uri("out", "model"), {"a.bin": b"a" * 1000, "b/c.bin": b"c"})
    storage.require_complete(s3.uri("out", "model"), produced_by="test")
    assert proxy.faults.injected == 5, proxy.faults.log


def test_read_timeout_is_retried(s3, proxy, monkeypatch):
    uri = s3.uri("slow.bin")
    storage.write_bytes(uri, b"payload")
    monkeypatch.setenv("PIPELINE_S3_READ_TIMEOUT", "1")
    s3.use_endpoint(monkeypatch, proxy.url)  # new clients with the short timeout
    proxy.stall(1, seconds=3)
    before = proxy.faults.requests
    assert storage.read_bytes(uri) == b"payload"
    # The stalled request was given up after the 1 s read timeout and sent again (without the timeout the
    # stalled one would have been answered, one request in all).
    assert proxy.faults.injected == 1 and proxy.faults.requests - before == 2, proxy.faults.log


def test_stage_subprocess_survives_transient_errors(s3, proxy, tmp_path):
    import subprocess
    import sys

    source = s3.upload_image_folder(tmp_path / "images", "source", classes=3, per_class=6)
    proxy.fail(3, status=503, code="SlowDown")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "prepare", "--params", str(PARAMS),
         *sets([*TINY, f"data.source={source}", f"paths.root={s3.uri('run')}"])],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert proxy.faults.injected == 3
    storage.require_complete(s3.uri("run", "data", "prepared"), produced_by="prepare")
    s3.assert_no_secret(done.stdout, done.stderr)


# ---------------------------------------------------------------- permanent errors: exit 2, named


def test_missing_buckets_exit_2_naming_each_before_any_work(s3, cli):
    code, out, err = cli("prepare", "--params", str(PARAMS), *sets([
        *TINY, "data.source=s3://no-such-source-bucket/images", "paths.root=s3://no-such-artifact-bucket/run"]))
    assert code == 2, out + err
    assert "no-such-source-bucket" in err and "no-such-artifact-bucket" in err and "does not exist" in err
    assert "[prepare]" not in out  # failed before reading or computing anything


def test_access_denied_exits_2_naming_the_bucket(s3, proxy, cli):
    proxy.deny(s3.bucket)
    code, out, err = cli("pretrain", "--params", str(PARAMS), *sets([*TINY, f"paths.root={s3.uri('run')}"]))
    assert code == 2, out + err
    assert "access denied" in err and s3.bucket in err
    assert proxy.faults.requests <= 3  # at once: no retry loop on a 403


def test_denied_source_key_exits_2_naming_it(s3, proxy, cli, tmp_path):
    source = s3.upload_image_folder(tmp_path / "images", "private/images", classes=3, per_class=4)
    proxy.deny(f"{s3.bucket}/private")
    code, out, err = cli("prepare", "--params", str(PARAMS),
                         *sets([*TINY, f"data.source={source}", f"paths.root={tmp_path / 'out'}"]))
    assert code == 2, out + err
    assert "access denied" in err and "private/images" in err


def test_no_such_key_names_bucket_and_key(s3):
    with pytest.raises(DataError) as err:
        storage.read_bytes(s3.uri("models", "missing.pt"))
    text = err.value.render()
    assert "models/missing.pt" in text and s3.bucket in text and "not found" in text
    with pytest.raises(DataError, match="no complete output"):
        storage.require_complete(s3.uri("models", "pretrain"), produced_by="pretrain")


def test_missing_credentials_exit_2(s3, cli, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3.use_endpoint(monkeypatch, s3.endpoint)
    code, out, err = cli("prepare", "--params", str(PARAMS), *sets([*TINY, f"paths.root={s3.uri('run')}"]))
    assert code == 2, out + err
    assert "no AWS credentials found" in err, err


# ---------------------------------------------------------------- crash mid-upload


class Crash(Exception):
    pass


@contextlib.contextmanager
def _crash_after(method: str, calls_allowed: int):
    """The process dies (here: raises) during `method` once `calls_allowed` calls went through."""
    fs = storage.filesystem("s3://x")[0]  # the cached instance storage uses; sync methods live on it
    original = getattr(fs, method)
    count = {"n": 0}

    def flaky(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls_allowed:
            raise Crash(f"killed during {method}")
        return original(*args, **kwargs)

    setattr(fs, method, flaky)
    try:
        with pytest.raises(Crash):
            yield
    finally:
        setattr(fs, method, original)


def test_crash_mid_upload_keeps_previous_output_complete(s3):
    uri = s3.uri("models", "pretrain")
    _publish(uri, {"backbone.pt": b"v1", "summary.json": b"{}"})
    with _crash_after("put_file", calls_allowed=1):
        _publish(uri, {"backbone.pt": b"v2-new", "extra.bin": b"x", "summary.json": b"{2}"})
    storage.require_complete(uri, produced_by="pretrain")  # the previous output still counts
    assert storage.read_bytes(storage.join(uri, "backbone.pt")) == b"v1"
    assert s3.keys() == ["models/pretrain/_COMPLETE", "models/pretrain/backbone.pt", "models/pretrain/summary.json"]


def test_crash_during_switch_over_is_refused_never_half_used(s3):
    uri = s3.uri("models", "finetune")
    _publish(uri, {"finetuned.pt": b"v1"})
    with _crash_after("copy", calls_allowed=0):
        _publish(uri, {"finetuned.pt": b"v2"})
    with pytest.raises(DataError, match="no complete output"):
        storage.require_complete(uri, produced_by="finetune")


def test_first_publish_crash_leaves_nothing_visible(s3):
    uri = s3.uri("data", "prepared")
    with _crash_after("put_file", calls_allowed=1):
        _publish(uri, {"dataset.npz": b"1", "manifest.json": b"2"})
    assert s3.keys() == []
    with pytest.raises(DataError, match="no complete output"):
        storage.require_complete(uri, produced_by="prepare")


def test_republish_replaces_contents_and_drops_stale_files(s3):
    uri = s3.uri("models", "release")
    _publish(uri, {"finetuned.pt": b"v1", "old-only.txt": b"x"})
    _publish(uri, {"finetuned.pt": b"v2", "model_card.json": b"{}"})
    assert s3.keys() == ["models/release/_COMPLETE", "models/release/finetuned.pt", "models/release/model_card.json"]
    assert storage.read_bytes(storage.join(uri, "finetuned.pt")) == b"v2"
