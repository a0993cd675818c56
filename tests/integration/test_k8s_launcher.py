"""KubernetesLauncher through the official client against the wire-level stand-in.

Pods run tests/k8s_standin/fake_stage.py instead of `python -m pipeline` so these tests stay
fast; the real 2-node DDP pretrain goes through the same fixture with the default command.
"""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client as k8s

from pipeline.launch import StageCommand
from pipeline.launch.k8s_manifests import render_job
from pipeline.launch.k8s_settings import KubernetesLaunchConfig
from pipeline.launch.k8s_api import KubernetesLaunchError
from pipeline.launch.k8s_cleanup import cleanup_orphans, delete_jobs_for_run
from pipeline.launch.kubernetes import KubernetesLauncher, LaunchCancelled, StageRestartsExhausted
from tests.k8s_standin import k8s_standin  # noqa: F401  (pytest fixture)
from tests.k8s_standin.fixture import FAKE, FAKE_IMAGE, wait_for as _wait_for

pytest_plugins = ["tests.s3_fixtures"]



def _cfg(tmp_path: Path, **overrides) -> KubernetesLaunchConfig:
    base = dict(namespace="ml", image=FAKE_IMAGE, command=FAKE, poll_seconds=0.2,
                log_dir=str(tmp_path / "logs"), termination_grace_seconds=3)
    return KubernetesLaunchConfig(**{**base, **overrides})


def _cmd(mode: str, run_id: str = "run-1") -> StageCommand:
    return StageCommand(stage="pretrain", args=["--set", "pretrain.max_steps=8"], env={"FAKE_MODE": mode},
                        run_id=run_id)


class Lines(list):
    """Thread-safe collector standing in for the Prefect task logger."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            self.append(line)

    def text(self) -> str:
        with self.lock:
            return "\n".join(self)



def test_two_pods_rendezvous_through_pod0_dns_and_stream_ranked_logs(k8s_standin, tmp_path):
    launcher = KubernetesLauncher(_cfg(tmp_path, nodes=2), k8s_standin.api_client())
    log = Lines()
    assert launcher.run(_cmd("rendezvous"), log) == 0
    text = log.text()
    assert "[rank 0] world_size=2 global_rank=0" in text
    assert "[rank 1] world_size=2 global_rank=1" in text
    assert "trainer.num_nodes=2" in text and "'NODE_RANK': '1'" in text
    kept = Path(tmp_path / "logs" / launcher.job_name)
    assert "world_size=2 global_rank=1" in (kept / "rank-1.log").read_text()
    assert "world_size=2 global_rank=0" in (kept / "rank-0.log").read_text()


def test_exit_2_fails_the_job_at_once_without_retry(k8s_standin, tmp_path):
    launcher = KubernetesLauncher(_cfg(tmp_path, max_restarts=3), k8s_standin.api_client())
    assert launcher.run(_cmd("exit:2"), Lines()) == 2
    assert len(k8s_standin.processes()) == 1 and launcher.restarts == []
    (job,) = k8s_standin.jobs()
    assert job["status"]["conditions"][0]["reason"] == "PodFailurePolicy"


def test_infra_failures_restart_as_new_attempts_within_max_restarts(k8s_standin, tmp_path, s3):
    launcher = KubernetesLauncher(_cfg(tmp_path, max_restarts=1), k8s_standin.api_client())
    cmd = _cmd(f"crash-once:{s3.uri('marker')}")
    cmd.env.update(k8s_standin.lend_s3(s3.endpoint))
    assert launcher.run(cmd, Lines()) == 0
    assert len(k8s_standin.processes()) == 2 and len(launcher.jobs) == 2
    assert launcher.restarts == ["rank 0 exited 1 on attempt 1 of 2"]
    with pytest.raises(StageRestartsExhausted) as caught:  # 1 try + 1 restart, then it gives up
        launcher.run(_cmd("exit:3"), Lines())
    assert str(caught.value) == "pretrain: rank 0 exited 3 on attempt 2 of 2; giving up"
    assert caught.value.exit_code == 3 and isinstance(caught.value, KubernetesLaunchError)
    assert len(k8s_standin.processes()) == 4


def test_cancel_deletes_job_service_and_pods_and_kills_processes(k8s_standin, tmp_path):
    launcher = KubernetesLauncher(_cfg(tmp_path, nodes=2), k8s_standin.api_client())
    outcome = {}

    def run():
        try:
            outcome["code"] = launcher.run(_cmd("sleep:600"), Lines())
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for(lambda: len([p for p in k8s_standin.pods() if p["status"]["phase"] == "Running"]) == 2, "2 running pods")
    launcher.cancel()
    thread.join(30)
    assert isinstance(outcome.get("error"), LaunchCancelled)
    _wait_for(lambda: not k8s_standin.jobs() and not k8s_standin.pods(), "Job and pods gone")
    assert k8s_standin.services() == []
    assert all(p.poll() is not None for p in k8s_standin.processes())


def test_evicted_single_pod_restarts_as_a_new_attempt_and_resumes(k8s_standin, tmp_path, s3):
    checkpoint = s3.uri("step.ckpt")
    launcher = KubernetesLauncher(_cfg(tmp_path, max_restarts=1), k8s_standin.api_client())
    log, outcome = Lines(), {}
    cmd = _cmd(f"steps:15:{checkpoint}")
    cmd.env.update(k8s_standin.lend_s3(s3.endpoint))
    thread = threading.Thread(target=lambda: outcome.update(code=launcher.run(cmd, log)))
    thread.start()
    _wait_for(lambda: s3.fs.exists(checkpoint) and int(s3.fs.cat_file(checkpoint)) >= 3, "3 steps")
    (pod,) = k8s_standin.pods()
    k8s_standin.evict(pod["metadata"]["name"])
    thread.join(60)
    # backoffLimit 0, DisruptionTarget -> FailJob: the launcher's new attempt (a new Job) resumes.
    assert outcome == {"code": 0}
    text = log.text()
    assert "resumed from step" in text and "finished total_steps=15" in text
    assert len(k8s_standin.processes()) == 2
    assert k8s_standin.processes()[0].returncode == 143
    assert len(launcher.restarts) == 1 and launcher.restarts[0].startswith("rank 0 lost (DisruptionTarget")
    assert "restart 1/1 of pretrain: rank 0 lost (DisruptionTarget" in text
    assert [j["metadata"]["name"] for j in k8s_standin.jobs()] == [launcher.jobs[1]]
    assert k8s_standin.jobs()[0]["metadata"]["labels"]["pipeline.example/attempt"] == "2"


def test_forbidden_names_the_permission_and_is_not_retried(k8s_standin, tmp_path):
    k8s_standin.fail_next("create", "jobs", 403)
    launcher = KubernetesLauncher(_cfg(tmp_path), k8s_standin.api_client())
    with pytest.raises(KubernetesLaunchError, match=r"cannot create jobs\.batch in namespace 'ml'.*k8s/base/rbac\.yaml"):
        launcher.run(_cmd("ok"), Lines())
    assert len(k8s_standin.requests("create", "jobs")) == 1
    assert k8s_standin.jobs() == [] and k8s_standin.processes() == []


def test_forbidden_mid_run_still_deletes_the_job(k8s_standin, tmp_path):
    k8s_standin.fail_next("list", "pods", 403)
    launcher = KubernetesLauncher(_cfg(tmp_path), k8s_standin.api_client())
    with pytest.raises(KubernetesLaunchError, match="cannot list pods"):
        launcher.run(_cmd("sleep:600"), Lines())
    _wait_for(lambda: not k8s_standin.jobs() and not k8s_standin.pods(), "Job and pods gone")


def test_unprocessable_names_the_field(k8s_standin, tmp_path):
    k8s_standin.fail_next("create", "jobs", 422)
    launcher = KubernetesLauncher(_cfg(tmp_path), k8s_standin.api_client())
    with pytest.raises(KubernetesLaunchError, match=r"spec\.template\.spec\.containers\[0\]\.resources"):
        launcher.run(_cmd("ok"), Lines())


def _post_job(host: str, job: dict, query: str = ""):
    # Raw HTTP: the client's own models would refuse to send unknown fields, a kubectl apply would not.
    request = urllib.request.Request(f"{host}/apis/batch/v1/namespaces/ml/jobs{query}", method="POST",
                                     data=json.dumps(job).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=30)


def test_standin_rejects_objects_that_fail_the_strict_schema(k8s_standin, tmp_path):
    job = render_job(_cfg(tmp_path), "bad-job", "pretrain", [], "run-1")
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8  # not a Container field
    with pytest.raises(urllib.error.HTTPError) as caught:
        _post_job(k8s_standin.host, job, "?fieldValidation=Strict")  # what kubectl sends by default
    # The real server cannot decode it strictly: 400 BadRequest (422 is for validation errors).
    assert caught.value.code == 400
    status = json.loads(caught.value.read())
    assert status["reason"] == "BadRequest"
    assert 'strict decoding error: unknown field "spec.template.spec.containers[0].gpus"' in status["message"]
    assert k8s_standin.jobs() == []


def test_standin_drops_unknown_fields_with_a_warning_by_default(k8s_standin, tmp_path):
    """No fieldValidation (the Python client, prefect-kubernetes' worker): dropped, with a Warning header.
    The worker's Job manifests must carry parallelism/completions on the pod spec, where they are unknown."""
    job = render_job(_cfg(tmp_path), "lenient-job", "pretrain", [], "run-1", {"FAKE_MODE": "ok"})
    job["spec"]["template"]["spec"].update(parallelism=1, completions=1)
    with _post_job(k8s_standin.host, job) as response:
        assert response.status == 201
        warnings = response.headers.get_all("Warning")
        created = json.loads(response.read())
    assert sorted(warnings) == ['299 - "unknown field \\"spec.template.spec.completions\\""',
                        '299 - "unknown field \\"spec.template.spec.parallelism\\""']
    assert not {"parallelism", "completions"} & set(created["spec"]["template"]["spec"])
    (stored,) = k8s_standin.jobs()
    assert not {"parallelism", "completions"} & set(stored["spec"]["template"]["spec"])


def test_cleanup_finds_jobs_of_dead_and_cancelled_flow_runs(k8s_standin, tmp_path):
    batch, api = k8s.BatchV1Api(k8s_standin.api_client()), k8s_standin.api_client()
    cfg = _cfg(tmp_path)
    for run_id in ("alive-run", "crashed-run", "cancelled-run"):
        job = render_job(cfg, f"pretrain-{run_id}", "pretrain", [], run_id, {"FAKE_MODE": "sleep:600"})
        batch.create_namespaced_job("ml", job)
    assert cleanup_orphans("ml", ["alive-run", "cancelled-run"], api, log=lambda _: None) == ["pretrain-crashed-run"]
    assert delete_jobs_for_run("cancelled-run", "ml", api, log=lambda _: None) == ["pretrain-cancelled-run"]
    _wait_for(lambda: [j["metadata"]["name"] for j in k8s_standin.jobs()] == ["pretrain-alive-run"], "orphans deleted")
    _wait_for(lambda: len(k8s_standin.pods()) == 1, "only the live run's pod left")
