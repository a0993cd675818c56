"""The real kubectl against the API stand-in: apply the dev overlay, run, inspect and delete Jobs.

Each test drives kubectl 1.32 through a kubeconfig for the stand-in and asserts on its exit
code and output, so discovery, server-side printing, field validation, logs, watches (the
`--wait` of delete, `kubectl wait`) and garbage collection are all exercised the way an
operator would meet them (docs/kubernetes.md).

Pods run in the image `make image` built (served as registry.example/pipeline), each in its own
network namespace with its own IP: they see the image's environment and filesystem, never the
host's, and reach each other by name only through the stand-in's cluster DNS, which answers for
`<hostname>.<subdomain>.<ns>.svc.cluster.local` once a headless Service selects that pod.
"""
from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import uuid
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from pipeline.launch.k8s_manifests import render_job, render_service

from pipeline.launch.k8s_settings import KubernetesLaunchConfig
from tests.k8s_standin.fixture import wait_for as _wait_for
from tests.k8s_standin import k8s_standin  # noqa: F401  (pytest fixture)
from tests.k8s_standin import protobuf, resources, runtime
from tests.k8s_standin.fixture import FAKE, FAKE_IMAGE, REPO_ROOT, require_image

KUBECTL = shutil.which("kubectl")
NS = "ml-pipeline"
pytestmark = pytest.mark.skipif(not KUBECTL, reason="needs kubectl")


def _kubectl_runner(kubeconfig: Path, home: Path):
    env = {"KUBECONFIG": str(kubeconfig), "HOME": str(home), "PATH": os.environ.get("PATH", "")}

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([KUBECTL, *args], capture_output=True, text=True, env=env, timeout=timeout)
    return run


@pytest.fixture
def kubectl(k8s_standin, tmp_path):  # noqa: F811
    # HOME: kubectl caches discovery under ~/.kube; each test gets its own.
    return _kubectl_runner(k8s_standin.write_kubeconfig(tmp_path / "kubeconfig"), tmp_path / "home")


def _plain_job(name: str, command: list[str], env: dict | None = None, grace: int = 2, **spec) -> dict:
    # grace: `sh -c "sleep 600"` as a container's PID 1 has no SIGTERM handler, so the kernel drops the
    # kubelet's SIGTERM and deletion waits out the whole grace period (30 s by default), as on a cluster.
    container = {"name": "main", "image": "registry.example/pipeline:test", "command": command,
                 "env": [{"name": k, "value": v} for k, v in (env or {}).items()]}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NS},
            "spec": {"backoffLimit": 0, **spec,
                     "template": {"spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": grace,
                                           "containers": [container]}}}}


def _stage_job(name: str, mode: str, nodes: int = 2, command: list[str] = FAKE) -> tuple[dict, dict]:
    cfg = KubernetesLaunchConfig(namespace=NS, image=FAKE_IMAGE, command=command, nodes=nodes,
                                 termination_grace_seconds=3)
    job = render_job(cfg, name, "pretrain", [], "run-1", {"FAKE_MODE": mode})
    return job, render_service(cfg, name, "pretrain", "run-1")


# A rank's first step, as DDP's: resolve MASTER_ADDR (retrying while the cluster DNS answers NXDOMAIN,
# as a rank started before its Service must); then the fake stage, with the same argv.
RESOLVE_THEN_FAKE = ["python", "-c", (
    "import os, runpy, socket, sys, time\n"
    "for _ in range(150):\n"
    "    try:\n"
    "        print('master_ip=' + socket.gethostbyname(os.environ['MASTER_ADDR']), flush=True)\n"
    "        break\n"
    "    except OSError:\n"
    "        time.sleep(0.1)\n"
    "else:\n"
    "    print('master_ip=unresolved', flush=True)\n"
    "sys.argv[0] = '/opt/fakes/fake_stage.py'\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n")]

# What MASTER_ADDR resolves to, printed at each change: `unresolved` (NXDOMAIN) or an address.
WATCH_MASTER = ["python", "-c", (
    "import os, socket, time\n"
    "last = None\n"
    "while True:\n"
    "    try:\n"
    "        now = socket.gethostbyname(os.environ['MASTER_ADDR'])\n"
    "    except OSError:\n"
    "        now = 'unresolved'\n"
    "    if now != last:\n"
    "        print('master_ip=' + now, flush=True)\n"
    "        last = now\n"
    "    time.sleep(0.1)\n")]


def _owned_by(obj: dict, owner) -> dict:
    obj["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": owner.metadata.name,
                                           "uid": owner.metadata.uid}]
    return obj


def _pod_netns(standin) -> set[int]:
    """The pods' network namespaces (nsfs inodes) while their sandboxes exist: every process of a
    container is in one, whatever started it, so they find processes a pod leaves behind."""
    with standin.cluster.lock:
        return {os.stat(f"/run/netns/{pod.sandbox[0]}").st_ino for pod in standin.cluster.pods.values()
                if pod.sandbox}


def _pids_in(netns: set[int]) -> list[int]:
    """Host PIDs of the live processes in these network namespaces."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.stat(proc / "ns" / "net").st_ino in netns:
                pids.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile (or a zombie: nothing left of it but its exit status)
    return pids


def _no_pod_process_left(standin, netns: set[int]) -> None:
    assert all(p.poll() is not None for p in standin.processes())  # the shims
    # ...and the containers: a shim's SIGKILL ends its container asynchronously, so allow a moment.
    try:
        _wait_for(lambda: not _pids_in(netns), "no process left in the pods' network namespaces", timeout=5)
    finally:
        for pid in _pids_in(netns):  # a failure's leftovers: not for the rest of the session to inherit
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _running(standin, job: str, count: int) -> list[dict]:
    return _wait_for(lambda: pods if len(pods := standin.running(job)) == count else None,
                     f"{count} running pod(s) of {job}")


def test_apply_dev_overlay_twice(kubectl):
    overlay = str(REPO_ROOT / "k8s" / "overlays" / "dev")
    docs = [d for d in yaml.safe_load_all(kubectl("kustomize", overlay).stdout) if d]
    first = kubectl("apply", "-k", overlay)
    assert first.returncode == 0, first.stderr
    for doc in docs:  # kubectl prints <kind>.<group>/<name>, as discovery named them
        group = doc["apiVersion"].rpartition("/")[0]
        assert f"{doc['kind'].lower()}{'.' + group if group else ''}/{doc['metadata']['name']} created" in first.stdout
    second = kubectl("apply", "-k", overlay)  # GET + three-way diff: nothing to patch
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout and second.stdout.count("unchanged") == len(docs)
    got = kubectl("get", "jobs,pods", "-n", NS)
    assert got.returncode == 0 and "No resources found in ml-pipeline namespace." in got.stderr
    launch = kubectl("get", "configmap", "training-launch", "-n", NS, "-o", "jsonpath={.data.overlay\\.json}")
    assert json.loads(launch.stdout) == json.loads((REPO_ROOT / "k8s/overlays/dev/launch.json").read_text())


def test_job_pods_logs_and_delete(k8s_standin, kubectl):  # noqa: F811
    api = k8s_standin.api_client()
    job, svc = _stage_job("demo", "sleep:600", command=RESOLVE_THEN_FAKE)
    created = k8s.BatchV1Api(api).create_namespaced_job(NS, job)
    k8s.CoreV1Api(api).create_namespaced_service(NS, _owned_by(svc, created))
    running = sorted(_running(k8s_standin, "demo", 2), key=lambda p: p["metadata"]["name"])
    pods = [p["metadata"]["name"] for p in running]
    ips = [p["status"]["podIP"] for p in running]
    assert ips[0] != ips[1] and "127.0.0.1" not in ips  # each pod has its own address
    netns = _pod_netns(k8s_standin)
    assert len(netns) == 2
    _wait_for(lambda: len(_pids_in(netns)) >= 2, "both containers' processes")  # what the last check scans for

    got = kubectl("get", "jobs,pods", "-n", NS)
    assert got.returncode == 0, got.stderr
    assert "job.batch/demo" in got.stdout and "0/2" in got.stdout
    for pod in pods:
        assert any(line.startswith(f"pod/{pod}") and "Running" in line for line in got.stdout.splitlines())
    logs = [_wait_for(lambda: (lambda r: r if r.returncode or "argv=" in r.stdout else None)(
        kubectl("logs", pod, "-n", NS)), f"{pod}'s argv line") for pod in pods]
    for rank, log in enumerate(logs):
        assert log.returncode == 0, log.stderr
        assert "argv=['pretrain'" in log.stdout and f"'NODE_RANK': '{rank}'" in log.stdout
        # The name itself, not an address rewritten for the pod: each rank resolves it.
        assert "'MASTER_ADDR': 'demo-0.demo.ml-pipeline.svc.cluster.local', 'MASTER_PORT': '29500'" in log.stdout
    # Rank 0 finds its own name in its /etc/hosts; rank 1 asks the cluster DNS, which answers with
    # rank 0's pod IP because the headless Service `demo` selects that pod.
    assert [log.stdout.splitlines()[0] for log in logs] == [f"master_ip={ips[0]}"] * 2

    deleted = kubectl("delete", "job", "demo", "-n", NS)
    assert deleted.returncode == 0 and 'job.batch "demo" deleted' in deleted.stdout
    _wait_for(lambda: "No resources found" in kubectl("get", "jobs,pods,services", "-n", NS).stderr,
              "the Job's pods and owned Service to go")
    _no_pod_process_left(k8s_standin, netns)


def test_foreground_delete_waits_for_pods_through_a_watch(k8s_standin, kubectl):  # noqa: F811
    slow_exit = ["sh", "-c", "trap 'sleep 1; exit 143' TERM; while true; do sleep 0.1; done"]
    k8s.BatchV1Api(k8s_standin.api_client()).create_namespaced_job(NS, _plain_job("slow", slow_exit, grace=30))
    _running(k8s_standin, "slow", 1)
    netns = _pod_netns(k8s_standin)
    _wait_for(lambda: _pids_in(netns), "the container's process")  # Running: its shim started, maybe not yet it
    deleted = kubectl("delete", "job", "slow", "-n", NS, "--cascade=foreground", "--timeout=30s")
    assert deleted.returncode == 0, deleted.stderr
    # kubectl returned only once the Job was gone, and Foreground keeps it until its pod has exited
    # (the pod traps SIGTERM, takes a second and exits: its container's PID 1, so the whole container
    # goes with it): so its processes must already be gone.
    assert all(proc.poll() is not None for proc in k8s_standin.processes())
    assert _pids_in(netns) == []
    assert k8s_standin.jobs() == [] and k8s_standin.pods() == []


def test_kubectl_wait_sees_parallelism_honoured(k8s_standin, kubectl, tmp_path):  # noqa: F811
    batch = k8s.BatchV1Api(k8s_standin.api_client())
    batch.create_namespaced_job(NS, _plain_job("serial", ["sh", "-c", "sleep 0.3"], completions=3))  # parallelism 1
    batch.create_namespaced_job(NS, _plain_job("pairs", ["sh", "-c", "sleep 0.3"], completions=4, parallelism=2,
                                               completionMode="Indexed"))
    most = {"serial": 0, "pairs": 0}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(j["status"].get("completionTime") for j in k8s_standin.jobs()):
        for job in most:
            active = [p for p in k8s_standin.pods() if p["metadata"]["labels"]["job-name"] == job
                      and p["status"]["phase"] in ("Pending", "Running")]
            most[job] = max(most[job], len(active))
        time.sleep(0.02)
    waited = kubectl("wait", "--for=condition=complete", "job/serial", "job/pairs", "-n", NS, "--timeout=30s")
    assert waited.returncode == 0, waited.stderr
    assert "job.batch/serial condition met" in waited.stdout and "job.batch/pairs condition met" in waited.stdout
    assert most == {"serial": 1, "pairs": 2}
    got = kubectl("get", "job", "serial", "pairs", "-n", NS, "-o", "jsonpath={.items[*].status.succeeded}")
    assert got.stdout.split() == ["3", "4"]


def test_deleting_the_flow_run_job_collects_its_stage_job_pods_and_service(k8s_standin, kubectl):  # noqa: F811
    api = k8s_standin.api_client()
    batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    flow_run = batch.create_namespaced_job(NS, _plain_job("flow-run", ["sh", "-c", "sleep 600"]))
    stage_job, stage_svc = _stage_job("stage", "sleep:600")
    stage = batch.create_namespaced_job(NS, _owned_by(stage_job, flow_run))  # no blockOwnerDeletion, as the launcher
    core.create_namespaced_service(NS, _owned_by(stage_svc, stage))
    orphan = {"metadata": {"name": "dangling", "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "gone", "uid": "00000000-0000-4000-8000-000000000000"}]}}
    core.create_namespaced_config_map(NS, orphan)
    _running(k8s_standin, "flow-run", 1), _running(k8s_standin, "stage", 2)
    netns = _pod_netns(k8s_standin)
    assert len(netns) == 3
    _wait_for(lambda: len(_pids_in(netns)) >= 3, "the three containers' processes")
    assert "No resources found" in kubectl("get", "configmaps", "-n", NS).stderr  # an absent owner: collected

    deleted = kubectl("delete", "job", "flow-run", "-n", NS)  # kubectl's default: Background propagation
    assert deleted.returncode == 0, deleted.stderr
    _wait_for(lambda: "No resources found" in kubectl("get", "jobs,pods,services", "-n", NS).stderr,
              "the stage Job, its pods and its Service to be collected")
    _no_pod_process_left(k8s_standin, netns)


def test_orphan_cascade_leaves_dependents(k8s_standin, kubectl):  # noqa: F811
    batch = k8s.BatchV1Api(k8s_standin.api_client())
    owner = batch.create_namespaced_job(NS, _plain_job("owner", ["sh", "-c", "sleep 600"]))
    batch.create_namespaced_job(NS, _owned_by(_plain_job("kept", ["sh", "-c", "sleep 600"]), owner))
    _running(k8s_standin, "kept", 1)
    assert kubectl("delete", "job", "owner", "-n", NS, "--cascade=orphan").returncode == 0
    time.sleep(0.5)  # the garbage collector had its chance
    got = kubectl("get", "jobs", "-n", NS, "-o", "name")
    assert got.stdout.split() == ["job.batch/kept"]


# What a pod sees, as JSON: its environment, where it runs and as whom, whether the host's checkout or
# another pod's /tmp shows through, and the Jobs it lists with the kubeconfig standing in for its
# ServiceAccount token (the image's kubernetes client, as the flow-run pod uses it).
DUMP = ["python", "-c", (
    "import json, os\n"
    "seen = os.path.exists('/tmp/seen')\n"
    "open('/tmp/seen', 'w').close()\n"
    "jobs = None\n"
    "if 'KUBECONFIG' in os.environ:\n"
    "    from kubernetes import client, config\n"
    "    config.load_kube_config()\n"
    f"    jobs = sorted(j.metadata.name for j in client.BatchV1Api().list_namespaced_job('{NS}').items)\n"
    "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'uid': os.getuid(), 'seen': seen,\n"
    f"                  'host_checkout': os.path.exists('{REPO_ROOT / 'pyproject.toml'}'), 'jobs': jobs}}))\n")]


def test_pods_see_only_their_manifests_env(k8s_standin, kubectl, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HOST_ONLY_VARIABLE", "must-not-leak")  # in the stand-in's own process too
    assert kubectl("create", "configmap", "settings", "-n", NS, "--from-literal=LEVEL=debug").returncode == 0
    assert kubectl("create", "secret", "generic", "creds", "-n", NS, "--from-literal=TOKEN=s3cr3t").returncode == 0
    job = _plain_job("env", DUMP, {"GREETING": "hi $(LEVEL)"}, completions=1, completionMode="Indexed")
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["envFrom"] = [{"configMapRef": {"name": "settings"}}, {"secretRef": {"name": "creds"}, "prefix": "S_"}]
    no_token = _plain_job("no-token", DUMP)
    no_token["spec"]["template"]["spec"]["automountServiceAccountToken"] = False
    batch = k8s.BatchV1Api(k8s_standin.api_client())
    for manifest in (no_token, job):  # both exist by the time the env pod lists Jobs
        batch.create_namespaced_job(NS, manifest)
    _wait_for(lambda: all(j.get("status", {}).get("succeeded") for j in k8s_standin.jobs()), "both Jobs to complete")

    seen = json.loads(kubectl("logs", "job/env", "-n", NS).stdout)
    env, image_env = seen["env"], runtime.image_config(require_image()).env
    # Exactly the image's ENV, the manifest's env/envFrom and what the kubelet adds: nothing of the host.
    assert set(env) == set(image_env) | {"LEVEL", "S_TOKEN", "GREETING", "HOSTNAME", "JOB_COMPLETION_INDEX",
                                         "KUBECONFIG"}
    assert "HOST_ONLY_VARIABLE" not in env and not any(k.startswith(("PYTEST_", "KUBERNETES_")) for k in env)
    assert (env["LEVEL"], env["S_TOKEN"], env["GREETING"]) == ("debug", "s3cr3t", "hi debug")
    assert (env["HOSTNAME"], env["JOB_COMPLETION_INDEX"]) == ("env-0", "0")
    assert env["PATH"] == image_env["PATH"] and env["PATH"].split(":")[0] == "/opt/venv/bin"  # the image's venv
    assert str(Path(sys.executable).parent) not in env["PATH"].split(":")  # not the host's
    assert (env["VIRTUAL_ENV"], env["HOME"]) == ("/opt/venv", "/tmp")
    assert (seen["cwd"], seen["uid"], seen["host_checkout"]) == ("/app", 10001, False)  # WORKDIR, USER; no host files
    assert seen["jobs"] == ["env", "no-token"]  # the pod's stand-in for a ServiceAccount token works
    assert ("list", "jobs", NS, None, f"system:serviceaccount:{NS}:default") in k8s_standin.requests("list", "jobs")
    other = json.loads(kubectl("logs", "job/no-token", "-n", NS).stdout)
    assert "KUBECONFIG" not in other["env"] and "JOB_COMPLETION_INDEX" not in other["env"] and other["jobs"] is None
    assert other["env"]["HOSTNAME"].startswith("no-token-")  # a NonIndexed pod's hostname is its name
    assert seen["seen"] is other["seen"] is False  # each pod's /tmp is its own: neither saw the other's file


def test_missing_secret_blocks_the_container_until_it_exists(k8s_standin, kubectl):  # noqa: F811
    job = _plain_job("needs-secret", ["sh", "-c", "echo token=$TOKEN"])
    job["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late", "key": "TOKEN"}}}]
    k8s.BatchV1Api(k8s_standin.api_client()).create_namespaced_job(NS, job)
    _wait_for(lambda: "CreateContainerConfigError" in kubectl("get", "pods", "-n", NS).stdout, "the config error")
    assert kubectl("create", "secret", "generic", "late", "-n", NS, "--from-literal=TOKEN=t").returncode == 0
    assert kubectl("wait", "--for=condition=complete", "job/needs-secret", "-n", NS, "--timeout=30s").returncode == 0
    assert kubectl("logs", "job/needs-secret", "-n", NS).stdout.strip() == "token=t"


def test_master_addr_resolves_only_through_a_matching_headless_service(k8s_standin, kubectl):  # noqa: F811
    job, svc = _stage_job("rdv", "sleep:600", command=WATCH_MASTER)
    wrong = copy.deepcopy(svc)
    wrong["spec"]["selector"] = {"app": "someone-else"}  # the Service exists, but selects no pod of the Job
    k8s.CoreV1Api(k8s_standin.api_client()).create_namespaced_service(NS, wrong)
    k8s.BatchV1Api(k8s_standin.api_client()).create_namespaced_job(NS, job)
    rank0, rank1 = sorted(_running(k8s_standin, "rdv", 2), key=lambda p: p["metadata"]["name"])
    # Rank 1 asks the cluster DNS (rank 0 would find its own name in its /etc/hosts).
    log = lambda: kubectl("logs", rank1["metadata"]["name"], "-n", NS).stdout  # noqa: E731
    _wait_for(lambda: "master_ip=" in log(), "rank 1's first lookup")
    time.sleep(1.5)  # ~15 more lookups, all against the Service that selects no pod
    assert log().splitlines() == ["master_ip=unresolved"]

    selector = json.dumps({"spec": {"selector": {"app": None, **svc["spec"]["selector"]}}})
    patched = kubectl("patch", "service", "rdv", "-n", NS, "--type=merge", "-p", selector)
    assert patched.returncode == 0, patched.stderr
    _wait_for(lambda: len(log().splitlines()) > 1, "rank 1 to resolve MASTER_ADDR")
    assert log().splitlines() == ["master_ip=unresolved", f"master_ip={rank0['status']['podIP']}"]
    assert rank0["status"]["podIP"] != rank1["status"]["podIP"]


def test_bad_bodies_get_a_status_not_a_dropped_connection(kubectl, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": ')
    raw = kubectl("create", "--raw", f"/apis/batch/v1/namespaces/{NS}/jobs", "-f", str(bad))
    assert raw.returncode != 0
    assert "Error from server (BadRequest)" in raw.stderr and "json parse error" in raw.stderr

    job = _plain_job("strict", ["true"])
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8
    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps(job))
    strict = kubectl("create", "-f", str(manifest))  # kubectl's default --validate=strict
    assert strict.returncode != 0
    assert 'strict decoding error: unknown field "spec.template.spec.containers[0].gpus"' in strict.stderr
    warn = kubectl("create", "-f", str(manifest), "--validate=warn")
    assert warn.returncode == 0 and "job.batch/strict created" in warn.stdout
    assert 'Warning: unknown field "spec.template.spec.containers[0].gpus"' in warn.stderr


def _host_pids_with(token: str) -> list[int]:
    """Host PIDs whose command line holds `token`: the host's /proc sees pods' processes too."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and token.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile
    return pids


def test_standalone_server_serves_until_sigterm(tmp_path):
    config, token = tmp_path / "kubeconfig", f"standin-sleeper-{uuid.uuid4().hex}"
    server = subprocess.Popen([sys.executable, "-m", "tests.k8s_standin", "--kubeconfig", str(config),
                               "--logdir", str(tmp_path / "logs")], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and config.exists()
        kubectl = _kubectl_runner(config, tmp_path / "home")
        # The token only marks the pod's process, so the host can find it (the pod's files are not the host's).
        job = _plain_job("sleeper", ["python", "-c", "import time; time.sleep(600)", token])
        (tmp_path / "job.json").write_text(json.dumps(job))
        assert kubectl("create", "-f", str(tmp_path / "job.json")).returncode == 0
        _wait_for(lambda: "Running" in kubectl("get", "pods", "-n", NS).stdout and _host_pids_with(token),
                  "the pod to run")
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        # The pod's process went with the server (a shim's SIGKILL ends its container asynchronously).
        _wait_for(lambda: not _host_pids_with(token), "the pod's process to go with the server", timeout=5)
    finally:
        if server.poll() is None:
            server.kill()
        for pid in _host_pids_with(token):  # whatever a failure above left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- `kubectl create <kind>`: typed clients that send protobuf ------------------------------------
PROTOBUF = "application/vnd.kubernetes.protobuf"


def _create(kubectl, *args: str) -> subprocess.CompletedProcess:
    """`kubectl create ...`, asserting it worked and that its body went as protobuf (-v=7 logs headers)."""
    done = kubectl("-v=7", "create", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Content-Type: {PROTOBUF}" in done.stderr  # else this test would not exercise protobuf.py
    return done


def _stored(standin, plural: str, name: str, namespace: str | None = NS) -> dict:
    (obj,) = [o for o in standin.objects(plural) if o["metadata"]["name"] == name
              and o["metadata"].get("namespace") == namespace]
    return obj


def test_kubectl_create_job_wait_logs_get_and_delete(k8s_standin, kubectl):  # noqa: F811
    created = _create(kubectl, "job", "demo", "-n", NS, "--image=registry.example/pipeline:test", "--",
                      "python", "-c", "print(6 * 7)")
    assert "job.batch/demo created" in created.stdout
    (job,) = k8s_standin.jobs()
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["restartPolicy"] == "Never"
    assert pod_spec["containers"] == [{"name": "demo", "image": "registry.example/pipeline:test",
                                       "command": ["python", "-c", "print(6 * 7)"]}]

    waited = kubectl("wait", "--for=condition=complete", "job/demo", "-n", NS, "--timeout=60s")
    assert waited.returncode == 0, waited.stderr
    assert "job.batch/demo condition met" in waited.stdout
    logs = kubectl("logs", "job/demo", "-n", NS)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.strip() == "42"
    got = kubectl("get", "job", "demo", "-n", NS, "-o", "json")
    assert got.returncode == 0, got.stderr
    shown = json.loads(got.stdout)
    assert shown["spec"]["template"]["spec"]["containers"][0]["command"] == ["python", "-c", "print(6 * 7)"]
    assert shown["status"]["succeeded"] == 1
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in shown["status"]["conditions"])
    (pod,) = k8s_standin.pods()
    assert pod["metadata"]["labels"]["job-name"] == "demo" and pod["status"]["phase"] == "Succeeded"

    deleted = kubectl("delete", "job", "demo", "-n", NS)
    assert deleted.returncode == 0 and 'job.batch "demo" deleted' in deleted.stdout
    _wait_for(lambda: "No resources found" in kubectl("get", "jobs,pods", "-n", NS).stderr,
              "the Job and its pod to go")
    assert kubectl("get", "job", "demo", "-n", NS).returncode != 0


def test_kubectl_create_subcommands_store_what_they_were_told(k8s_standin, kubectl):  # noqa: F811
    _create(kubectl, "configmap", "settings", "-n", NS, "--from-literal=LEVEL=debug", "--from-literal=EMPTY=")
    assert _stored(k8s_standin, "configmaps", "settings")["data"] == {"LEVEL": "debug", "EMPTY": ""}

    _create(kubectl, "secret", "generic", "creds", "-n", NS, "--from-literal=TOKEN=s3cr3t")
    secret = _stored(k8s_standin, "secrets", "creds")
    assert secret["type"] == "Opaque" and secret["data"] == {"TOKEN": base64.b64encode(b"s3cr3t").decode()}
    _create(kubectl, "secret", "docker-registry", "pull", "-n", NS, "--docker-server=registry.example",
            "--docker-username=bot", "--docker-password=pw")
    pull = _stored(k8s_standin, "secrets", "pull")
    assert pull["type"] == "kubernetes.io/dockerconfigjson"
    auth = json.loads(base64.b64decode(pull["data"][".dockerconfigjson"]))["auths"]["registry.example"]
    assert (auth["username"], auth["password"]) == ("bot", "pw")

    _create(kubectl, "serviceaccount", "runner", "-n", NS)
    assert _stored(k8s_standin, "serviceaccounts", "runner")["metadata"]["uid"]

    _create(kubectl, "role", "reader", "-n", NS, "--verb=get,list", "--resource=pods,jobs.batch")
    assert _stored(k8s_standin, "roles", "reader")["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list"]}]
    _create(kubectl, "rolebinding", "reader", "-n", NS, "--role=reader", f"--serviceaccount={NS}:runner",
            "--user=alice")
    binding = _stored(k8s_standin, "rolebindings", "reader")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"}
    assert sorted(binding["subjects"], key=lambda s: s["kind"]) == [
        {"kind": "ServiceAccount", "name": "runner", "namespace": NS},
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]

    _create(kubectl, "service", "clusterip", "api", "-n", NS, "--tcp=5678:8080", "--tcp=80:http")
    api = _stored(k8s_standin, "services", "api")
    assert api["spec"]["selector"] == {"app": "api"} and api["spec"]["type"] == "ClusterIP"
    assert api["spec"]["ports"] == [  # IntOrString: a number, then a named port
        {"name": "5678-8080", "protocol": "TCP", "port": 5678, "targetPort": 8080},
        {"name": "80-http", "protocol": "TCP", "port": 80, "targetPort": "http"}]
    _create(kubectl, "service", "clusterip", "peers", "-n", NS, "--clusterip=None")
    assert _stored(k8s_standin, "services", "peers")["spec"]["clusterIP"] == "None"

    _create(kubectl, "namespace", "scratch")
    assert _stored(k8s_standin, "namespaces", "scratch", None)["metadata"]["name"] == "scratch"

    _create(kubectl, "deployment", "web", "-n", NS, "--image=registry.example/pipeline:test", "--replicas=0",
            "--port=8080", "--", "python", "-c", "print(1)")
    spec = _stored(k8s_standin, "deployments", "web")["spec"]
    assert spec["replicas"] == 0  # a pointer's zero is kept, not dropped as an unset field
    assert spec["selector"] == {"matchLabels": {"app": "web"}}
    assert spec["template"]["metadata"]["labels"] == {"app": "web"}
    assert spec["template"]["spec"]["containers"] == [
        {"name": "pipeline", "image": "registry.example/pipeline:test", "command": ["python", "-c", "print(1)"],
         "ports": [{"containerPort": 8080}]}]

    listed = kubectl("get", "configmaps,secrets,serviceaccounts,roles,rolebindings,services,deployments",
                     "-n", NS, "-o", "name")
    assert listed.returncode == 0, listed.stderr
    for name in ("configmap/settings", "secret/creds", "secret/pull", "serviceaccount/runner",
                 "role.rbac.authorization.k8s.io/reader", "rolebinding.rbac.authorization.k8s.io/reader",
                 "service/api", "service/peers", "deployment.apps/web"):
        assert name in listed.stdout.split()


def test_every_served_kind_has_a_protobuf_table():
    # kubectl's typed clients post protobuf with no fallback to JSON: a kind missing here could not be
    # created by `kubectl create <kind>` (rerun proto_gen.py after adding a kind to resources.KINDS).
    missing = {f"{k.api_version}/{k.kind}" for k in resources.KINDS} - set(protobuf.kinds())
    assert not missing


def _pb(*fields) -> bytes:
    """Protobuf wire format: (number, int) is a varint field, (number, str | bytes) a length-delimited one."""
    def varint(n: int) -> bytes:
        n &= (1 << 64) - 1
        out = b""
        while True:
            out += bytes([n & 0x7F | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out
    out = b""
    for number, value in fields:
        if isinstance(value, int):
            out += varint(number << 3) + varint(value)
        else:
            data = value.encode() if isinstance(value, str) else value
            out += varint(number << 3 | 2) + varint(len(data)) + data
    return out


def _envelope(api_version: str, kind: str, raw: bytes) -> bytes:
    return b"k8s\x00" + _pb((1, _pb((1, api_version), (2, kind))), (2, raw))  # runtime.Unknown


def _post(standin, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(standin.host + path, body, method="POST", headers={"Content-Type": PROTOBUF})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_protobuf_bodies_decode_as_the_go_types_do(k8s_standin):  # noqa: F811
    # Field numbers from k8s.io/api's generated.proto, written out here rather than read from the table.
    container = _pb((1, "main"), (2, "registry.example/pipeline:test"), (3, "python"),
                    (8, _pb((1, _pb((1, "cpu"), (2, _pb((1, "500m"))))))),  # resources.limits: Quantity
                    (19, _pb((2, _pb((1, _pb((1, "settings"))))))))  # envFrom[].configMapRef: inlined name
    pod_spec = _pb((1, _pb((1, "scratch"), (2, _pb((2, b""))))),  # volumes[]: inlined VolumeSource, emptyDir {}
                   (2, container))
    spec = _pb((1, 0),  # replicas: 0, a pointer
               (2, _pb((1, _pb((1, "app"), (2, "pb"))))),
               (3, _pb((1, _pb((11, _pb((1, "app"), (2, "pb"))))), (2, pod_spec))),
               (4, _pb((1, "RollingUpdate"), (2, _pb((1, _pb((1, 0), (2, 0))), (2, _pb((1, 1), (3, "25%"))))))),
               (5, 0),  # minReadySeconds: 0, not a pointer -> omitted, as `omitempty` omits it
               (99, 7))  # a field number this release does not know: skipped, as the Go decoder skips it
    status, created = _post(k8s_standin, f"/apis/apps/v1/namespaces/{NS}/deployments",
                            _envelope("apps/v1", "Deployment", _pb((1, _pb((1, "pb"))), (2, spec))))
    assert status == 201, created
    assert created["spec"] == {
        "replicas": 0, "selector": {"matchLabels": {"app": "pb"}},
        "template": {"metadata": {"labels": {"app": "pb"}}, "spec": {
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [{"name": "main", "image": "registry.example/pipeline:test", "command": ["python"],
                            "resources": {"limits": {"cpu": "500m"}},
                            "envFrom": [{"configMapRef": {"name": "settings"}}]}]}},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "25%"}}}
    assert _stored(k8s_standin, "deployments", "pb")["spec"] == created["spec"]

    configmap = lambda meta: _envelope("v1", "ConfigMap", _pb((1, meta), (2, _pb((1, "k"), (2, "v")))))  # noqa: E731
    path = f"/api/v1/namespaces/{NS}/configmaps"
    assert _post(k8s_standin, path, configmap(_pb((1, 5))))[0] == 400  # name sent as a varint: wrong wire type
    assert _post(k8s_standin, path, configmap(_pb((1, "cm")))[:-3])[0] == 400  # truncated
    assert _post(k8s_standin, path, b"k8s")[0] == 400  # no envelope
    status, body = _post(k8s_standin, path, _envelope("batch/v1", "Job", _pb((1, _pb((1, "cm"))))))
    assert status == 400 and "batch/v1" in body["message"]  # a Job is not a ConfigMap
    assert k8s_standin.objects("configmaps", NS) == []
    status, body = _post(k8s_standin, path, configmap(_pb((1, "cm"))))
    assert status == 201 and body["data"] == {"k": "v"}, body
