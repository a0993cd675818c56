"""`python -m flows.deploy --image ...`: the reference reaches the flow-run pod exactly as given.

Prefect's own `deploy(image=...)` splits a reference into name and tag and re-joins them as
`name:tag`, so `REGISTRY/pipeline@sha256:D` became `REGISTRY/pipeline:sha256:D` (InvalidImageName on
every flow-run pod) and `name:tag@sha256:D` was refused. Judged by the real clients: a real Prefect
server stores the deployments, and prefect-kubernetes's `resolve_for_flow_run` (what the worker calls
before it submits a flow run) renders the Job from the pool and the deployment as read back.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import kubernetes_validate
import pytest

from flows.deploy import image_reference_problem
from pipeline.launch.k8s_manifests import K8S_SCHEMA_VERSION
from tests.prefect_fixtures import PYTHON, REPO_ROOT, free_port, start_prefect_server, stop, tool_env

DIGEST = "sha256:" + "0123456789abcdef" * 4
DIGEST_REF = f"registry.example/pipeline@{DIGEST}"
TAG_AND_DIGEST_REF = f"registry.example:5000/team/pipeline:0.1.0@{DIGEST}"
TAG_REF = "ghcr.io/example/pipeline:0.1.0"

VALID = [DIGEST_REF, TAG_AND_DIGEST_REF, TAG_REF, "pipeline:0.1.0", "Registry.Example/pipeline:V1_0",
         "localhost:5000/a/b__c/d-e--f.g:1", f"registry.example/pipeline@sha512:{'ab' * 64}"]
INVALID = [
    f"registry.example/pipeline:{DIGEST}",  # what Prefect's deploy(image=...) stored
    f"registry.example/pipeline:0.1.0:{DIGEST}",
    "registry.example/Pipeline:0.1.0",  # upper case in the repository
    "registry.example/pipeline@sha256:abc",  # short digest
    f"registry.example/pipeline@sha256:{'AB' * 32}",  # upper-case hex
    f"registry.example/pipeline@sha512:{'a' * 64}",  # wrong length for the algorithm
    f"registry.example/pipeline@md5:{'a' * 32}",  # unsupported algorithm
    " registry.example/pipeline:0.1.0", "registry.example/pipeline:0.1.0\n", "registry.example/pipeline:",
    "registry.example/pipeline:-x", "registry.example//pipeline:1", "https://registry.example/pipeline:1", "",
]


def test_reference_grammar():
    assert [ref for ref in VALID if image_reference_problem(ref)] == []
    assert [ref for ref in INVALID if not image_reference_problem(ref)] == []
    assert "lower-case" in image_reference_problem("registry.example/Pipeline:0.1.0")
    assert "unsupported digest algorithm 'md5'" in image_reference_problem(f"r.example/p@md5:{'a' * 32}")
    assert image_reference_problem("[fd00::1]:5000/pipeline:0.1.0") is None  # distribution/reference >= 0.6


BUILDAH = shutil.which("buildah")


def _buildah_parses(ref: str) -> bool:
    """containers/image's reference parser (the same grammar, in Go) through buildah: a reference it
    can parse is looked up and not found; one it cannot parse fails before the lookup."""
    done = subprocess.run([BUILDAH, "inspect", "--type", "image", ref], capture_output=True, text=True, timeout=30)
    return done.returncode == 0 or "image not known" in done.stderr


@pytest.mark.skipif(not BUILDAH, reason="needs buildah (`make image` installs it)")
def test_reference_grammar_agrees_with_a_go_parser():
    if not _buildah_parses("registry.example/no-such-image:0.0.0"):
        pytest.skip("buildah cannot read its image store here")
    # Not the IPv6 hosts (newer than this buildah's parser) nor whitespace (argv, not a reference).
    cases = [r for r in VALID + INVALID if r and not r.startswith("[") and r == r.strip()]
    disagree = [(r, _buildah_parses(r)) for r in cases if _buildah_parses(r) != (image_reference_problem(r) is None)]
    assert disagree == []


def test_deploy_check_rejects_a_malformed_reference_naming_the_flag(tmp_path, capsys):
    from flows.deploy import main

    mangled = f"registry.example/pipeline:{DIGEST}"
    (tmp_path / "launch.json").write_text(json.dumps({"image": "registry.example/Pipeline:0.1.0"}))  # stage pods'
    assert main(["--check", "--image", mangled, "--storage", "s3://bucket/p", "--overlay", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--image: {mangled!r}: not an image reference" in err
    assert f"{tmp_path / 'launch.json'}: image: 'registry.example/Pipeline:0.1.0': the repository name must be lower-case" in err


def _flow_run_job(api: str, deployment_name: str) -> dict:
    """The Job the worker would submit for a new run of the deployment, by prefect-kubernetes's own code."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async def resolve() -> dict:
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(deployment_name)
            flow_run = await client.create_flow_run_from_deployment(deployment.id)
            pool = await client.read_work_pool(deployment.work_pool_name)
            config = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                flow_run, client=client, work_pool=pool, worker_name="test-worker", deployment=deployment)
            return config.job_manifest

    with temporary_settings({PREFECT_API_URL: api}):
        return asyncio.run(resolve())


def _job_variables(api: str, deployment_name: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_deployment_by_name(deployment_name).job_variables


@pytest.mark.slow
def test_references_deploy_as_given_and_reach_the_flow_run_job(tmp_path):
    overlay = tmp_path / "private-registry"  # the gpu overlay on a private registry
    overlay.mkdir()
    settings = json.loads((REPO_ROOT / "k8s/overlays/gpu/launch.json").read_text())
    (overlay / "launch.json").write_text(json.dumps({**settings, "image_pull_secrets": ["registry-credentials"]}))

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = start_prefect_server(tmp_path / "prefect-home", port, tmp_path / "server.log")
    env = tool_env(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "client-home"))

    def deploy(image: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "flows.deploy", "--image", image, "--storage", "s3://bucket/pipeline",
                               *extra], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)

    try:
        for image, extra, secrets in [(DIGEST_REF, ["--overlay", str(overlay)], [{"name": "registry-credentials"}]),
                                      (TAG_AND_DIGEST_REF, [], []), (TAG_REF, [], [])]:
            done = deploy(image, *extra)
            assert done.returncode == 0, done.stdout + done.stderr
            for name in ("train/train", "retrain/retrain"):
                # Redeploying replaces the variables: no Secret left over from the previous deploy.
                assert _job_variables(api, name) == {"image": image, **({"image_pull_secrets": secrets} if secrets else {})}
            job = _flow_run_job(api, "train/train")
            pod = job["spec"]["template"]["spec"]
            assert pod["containers"][0]["image"] == image
            assert pod["imagePullSecrets"] == secrets  # unset: [] (the pool's default), never an empty name
            assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)  # see test_k8s_kustomize
            kubernetes_validate.validate(job, K8S_SCHEMA_VERSION, strict=True)

        # A malformed reference registers nothing: the deployments keep the last good image.
        done = deploy(f"registry.example/pipeline:{DIGEST}")
        assert done.returncode == 2 and "--image: " in done.stderr and "not an image reference" in done.stderr
        assert _job_variables(api, "train/train") == {"image": TAG_REF}
    finally:
        stop(server)
