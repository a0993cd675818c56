"""The image `make image` built from our Dockerfile, run with buildah (chroot isolation, no daemon).

What the pods of every Kubernetes test run (tests/k8s_standin), checked here on its own: who it runs
as, what it carries (versions from requirements/image.lock, not from the test venv), and that a stage
runs in it. The stages themselves run in it in test_k8s_e2e.py and test_k8s_flow.py.
"""
from __future__ import annotations

import re
import subprocess

import pytest

from tests.k8s_standin.fixture import REPO_ROOT, require_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def container():
    name = subprocess.run(["buildah", "from", "--pull=never", f"containers-storage:{require_image()}"],
                          capture_output=True, text=True, check=True).stdout.strip()
    yield name
    subprocess.run(["buildah", "rm", name], capture_output=True)


def _run(container: str, script: str, timeout: float = 300) -> str:
    done = subprocess.run(["buildah", "run", "--isolation", "chroot", container, "--", "sh", "-c", script],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def _locked(package: str) -> str:
    lock = (REPO_ROOT / "requirements" / "image.lock").read_text()
    return re.search(rf"^{re.escape(package)}==(\S+)", lock, re.M).group(1)


def test_runs_as_its_non_root_user_with_the_locked_dependencies(container):
    out = _run(container, "id -u; id -g; pwd; python -c 'import sys; print(sys.version.split()[0])'; "
                          "python -c 'import botocore, s3fs, torch, lightning, prefect, dvc.version as d; "
                          "print(botocore.__version__, s3fs.__version__, torch.__version__, lightning.__version__, "
                          "prefect.__version__, d.__version__)'; pip check")
    uid, gid, cwd, python, versions, *_ = out.splitlines()
    assert (uid, gid, cwd) == ("10001", "10001", "/app")
    assert python.startswith("3.12.")
    botocore, s3fs, torch, lightning, prefect, dvc = versions.split()
    assert botocore == _locked("botocore") and s3fs == _locked("s3fs") and prefect == _locked("prefect")
    assert torch.startswith(_locked("torch")) and lightning == _locked("lightning") and dvc == _locked("dvc")
    assert "No broken requirements found" in out


def test_has_the_flow_run_entry_point_and_runs_a_stage(container):
    assert "Execute a flow run by ID" in _run(container, "prefect flow-run execute --help")
    # The stage entry point, on the embedded demo data, writing under the image's writable /tmp.
    out = _run(container, "cd /tmp && cp /app/params.yaml . && python -m pipeline prepare && ls data/prepared")
    assert re.search(r"\[prepare\] 1797 images, 10 classes", out) and "manifest.json" in out


def test_cannot_write_its_own_code(container):
    done = subprocess.run(["buildah", "run", "--isolation", "chroot", container, "--", "sh", "-c",
                           "touch /opt/venv/lib/python3.12/site-packages/x"], capture_output=True, text=True)
    assert done.returncode != 0 and "Permission denied" in done.stderr
