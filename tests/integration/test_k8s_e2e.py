"""The production path end to end, judged by the real clients wherever one runs here.

What a team does on a real cluster, step for step (docs/kubernetes.md, "First run"):
`kubectl apply -k k8s/overlays/dev` (the real kubectl), the S3 Secret, `python -m flows.deploy`
(creates the Kubernetes work pool from k8s/base/base-job-template.json and the two deployments
on a real Prefect server), a run requested as the UI's Run button does, and the real
prefect-kubernetes worker (`prefect worker start --type kubernetes`) submitting the flow-run Job.

Kubernetes itself is the wire-level stand-in (tests/k8s_standin): every pod runs in the image built
from our Dockerfile (`make image`), in its own network namespace, with the image's CMD replaced by
the worker's `args` and env only from the manifest, its ConfigMap and Secret references and the
downward API. Inside the flow-run pod, `prefect flow-run execute` (the image's Prefect, Python 3.12)
runs the `train` flow, which launches the five stage Jobs through the API; their pods read and write
artifacts, registry and DVC remote with the image's s3fs/botocore on a real S3 endpoint (moto on the
host's 127.0.0.1, reached at the node address). Then `retrain` with unchanged data launches no stage Job.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest
from kubernetes import client as k8s

from tests.k8s_standin import k8s_standin  # noqa: F401  (pytest fixture)
from tests.prefect_fixtures import PYTHON, REPO_ROOT, TINY, free_port, start_prefect_server, stop, tool_env
from tests.s3_fixtures import AWS_ENV

pytest_plugins = ["tests.s3_fixtures"]
pytestmark = pytest.mark.slow

NAMESPACE = "ml-pipeline"
IMAGE = "ghcr.io/example/pipeline:0.1.0"
STAGE_LABEL = "pipeline.example/stage"
WORKER = f"system:serviceaccount:{NAMESPACE}:prefect-worker"
FLOW_RUN = f"system:serviceaccount:{NAMESPACE}:pipeline-flow-run"


def _kubectl(kubeconfig, *args: str) -> str:
    done = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _run_flow(env: dict, api: str, deployment: str, tmp_path, timeout_s: float = 420):
    """Ask for a run as the UI does, let the real worker submit it once, wait for a final state."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        run = run_deployment(deployment, timeout=0)
        log = tmp_path / f"worker-{deployment.split('/')[0]}.log"
        worker = subprocess.run([PYTHON, "-m", "prefect", "worker", "start", "--pool", "training", "--type",
                                 "kubernetes", "--run-once"], env=env, cwd=tmp_path, timeout=180,
                                stdout=log.open("w"), stderr=subprocess.STDOUT)
        assert worker.returncode == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + timeout_s
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                state = client.read_flow_run(run.id).state
                if state.is_final():
                    return run.id, state
                time.sleep(2)
    raise AssertionError(f"{deployment} did not finish in {timeout_s:.0f} s; worker log:\n{log.read_text()[-3000:]}")


def _pods_reach_the_server_at(api: str, pod_api: str) -> None:
    """The worker passes its own PREFECT_API_URL to flow-run pods unless the pool's `env` says otherwise.
    In a cluster the worker runs in-cluster and its URL works in pods; here it runs on the host's loopback,
    so the pool's default env names the server as pods reach it, as an admin would for an external worker."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        pool = client.read_work_pool("training")
        template = pool.base_job_template
        env = template["variables"]["properties"]["env"]
        env["default"] = {**(env.get("default") or {}), "PREFECT_API_URL": pod_api}
        client.update_work_pool("training", WorkPoolUpdate(base_job_template=template))


def _granted(standin, role: str) -> set[tuple[str, str]]:
    """(verb, resource) pairs the Role that `kubectl apply` stored grants."""
    (obj,) = [r for r in standin.objects("roles", NAMESPACE) if r["metadata"]["name"] == role]
    return {(verb, res) for rule in obj["rules"] for res in rule["resources"] for verb in rule["verbs"]}


def _pod_logs(standin) -> str:
    return "\n".join(p.log_path.read_text(errors="replace") for p in standin.cluster.pods.values()
                     if p.log_path.exists())


def test_ui_run_through_the_real_worker_trains_promotes_on_s3_and_retrain_launches_nothing(
        k8s_standin, s3, tmp_path):  # noqa: F811
    kubeconfig = k8s_standin.write_kubeconfig(tmp_path / "kubeconfig")
    # 1. What an admin applies: namespace, both ServiceAccounts and Roles, worker, ConfigMaps.
    _kubectl(kubeconfig, "apply", "-k", str(REPO_ROOT / "k8s" / "overlays" / "dev"))
    credentials = k8s_standin.lend_s3(s3.endpoint)  # the keys, and moto as pods reach it (the node address)
    k8s.CoreV1Api(k8s_standin.api_client()).create_namespaced_secret(NAMESPACE, k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="s3-credentials"), string_data=credentials))

    # 2. A real Prefect server; the work pool and deployments exactly as the docs say.
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = start_prefect_server(tmp_path / "prefect-home", port, tmp_path / "server.log")
    # No AWS keys and no PIPELINE_* settings in the worker's or deployer's environment: whatever the
    # pods get, they get from the cluster (Secret, ConfigMap) and the deployment's parameters.
    worker_kubeconfig = k8s_standin.write_kubeconfig(tmp_path / "worker-kubeconfig", user=WORKER)
    env = {k: v for k, v in tool_env(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "client-home"),
                                     KUBECONFIG=str(worker_kubeconfig)).items()
           if not k.startswith(("AWS_", "PIPELINE_"))}
    # The stand-in serves no watches for the worker's kopf observer: it is off here (docs/kubernetes.md).
    env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_ENABLED"] = "false"
    storage = s3.uri("e2e")
    try:
        deploy = subprocess.run(
            [PYTHON, "-m", "flows.deploy", "--image", IMAGE, "--pool", "training", "--storage", storage,
             "--overlay", str(REPO_ROOT / "k8s" / "overlays" / "dev"),
             *[arg for item in [*TINY, "finetune.labels_per_class=5", f"paths.runs={tmp_path / 'runs'}"]
               for arg in ("--set", item)]],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        _pods_reach_the_server_at(api, k8s_standin.node_url(port) + "/api")

        # 3. The train run: flow-run Job from the template, four stage Jobs owned by it.
        run_id, state = _run_flow(env, api, "train/train", tmp_path)
        assert state.is_completed(), f"{state}\n{_pod_logs(k8s_standin)[-6000:]}"
        flow_jobs = [j for j in k8s_standin.jobs() if STAGE_LABEL not in j["metadata"]["labels"]]
        stage_jobs = [j for j in k8s_standin.jobs() if STAGE_LABEL in j["metadata"]["labels"]]
        assert len(flow_jobs) == 1, [j["metadata"]["name"] for j in k8s_standin.jobs()]
        flow_job = flow_jobs[0]
        assert flow_job["metadata"]["labels"]["prefect.io/flow-run-id"] == str(run_id)
        assert sorted(j["metadata"]["labels"][STAGE_LABEL] for j in stage_jobs) == \
            ["corpus", "evaluate", "finetune", "prepare", "pretrain"]
        for job in stage_jobs:  # losing the flow-run Job garbage-collects its GPU Jobs
            (owner,) = job["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"]) == \
                ("Job", flow_job["metadata"]["name"], flow_job["metadata"]["uid"])

        # The flow-run pod ran `prefect flow-run execute` under the image's real CMD/ENTRYPOINT, as the
        # pipeline-flow-run ServiceAccount, with the S3 keys from the Secret (the stand-in keeps argv/env).
        (flow_pod,) = [p for p in k8s_standin.cluster.pods.values()
                       if p.obj["metadata"]["labels"].get("job-name") == flow_job["metadata"]["name"]]
        assert flow_pod.argv == ["prefect", "flow-run", "execute"]  # found on the image's PATH (/opt/venv/bin)
        assert flow_pod.obj["spec"]["serviceAccountName"] == "pipeline-flow-run"
        assert flow_pod.env["AWS_ACCESS_KEY_ID"] == AWS_ENV["AWS_ACCESS_KEY_ID"]

        champion = json.loads(s3.fs.cat(f"{s3.bucket}/e2e/registry/champion.json"))
        assert champion["release"].startswith(f"{storage}/registry/releases/")
        assert s3.fs.exists(f"{s3.bucket}/e2e/registry/last_evaluated.json")
        # Stage outputs live under their stage-cache key (flows/stage_cache.py).
        assert len(s3.fs.glob(f"{s3.bucket}/e2e/artifacts/stages/evaluate/*/reports/metrics.json")) == 1

        # 4. The cron's retrain on unchanged data: one flow-run Job, no stage Job.
        _, state = _run_flow(env, api, "retrain/retrain", tmp_path)
        assert state.is_completed(), state
        assert len([j for j in k8s_standin.jobs() if STAGE_LABEL not in j["metadata"]["labels"]]) == 2
        assert len([j for j in k8s_standin.jobs() if STAGE_LABEL in j["metadata"]["labels"]]) == 5  # one per stage, none by retrain
        assert "no change" in _pod_logs(k8s_standin)

        # Least privilege that still works: every call the worker and the flow-run pods made (each as
        # its ServiceAccount) is granted by its Role, and each made some.
        for user, role in ((WORKER, "prefect-worker"), (FLOW_RUN, "pipeline-flow-run")):
            used = {(r[0], r[1]) for r in k8s_standin.requests() if r[4] == user}
            assert used and used <= _granted(k8s_standin, role), (role, used - _granted(k8s_standin, role))
    finally:
        stop(server)
