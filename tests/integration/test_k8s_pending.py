"""Pending, told apart (KubernetesLauncher on the stand-in, pods running the built image).

A pod that can never start (an unpullable image, a private registry without a pull secret, a GPU
request no node and no scale-up can fit) fails the stage in seconds, naming rank, pod, reason and
message, and leaves no Job. A pod on its way (its image pulling, a scale-up it triggered) gets
startup_timeout_seconds, however short pending_timeout_seconds is; past that limit the stage fails
naming what it was still doing. A Job Kueue keeps suspended waits admission_timeout_seconds.
Durations are printed, not asserted (`pytest -s` shows them).
"""
from __future__ import annotations

import base64
import json
import re
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s

from pipeline.launch import StageCommand
from pipeline.launch.k8s_settings import KubernetesLaunchConfig
from pipeline.launch.kubernetes import (
    KubernetesLauncher, StageCannotStart, StageNotAdmitted, StagePendingTimeout,
)
from tests.integration.test_k8s_launcher import Lines
from tests.k8s_standin import StandIn
from tests.k8s_standin.fixture import FAKE, FAKE_IMAGE, node_settings, wait_for

pytestmark = pytest.mark.slow
NS = "ml"
JOB = "pipeline.example/job"


@pytest.fixture
def standin(request, tmp_path):
    node = StandIn(tmp_path / "standin", secrets={"s3-credentials": {}},
                   node=node_settings(**getattr(request, "param", {})))
    yield node
    node.close()


def _cfg(tmp_path: Path, **overrides) -> KubernetesLaunchConfig:
    base = dict(namespace=NS, image=FAKE_IMAGE, command=FAKE, poll_seconds=0.5, log_dir=str(tmp_path / "logs"),
                termination_grace_seconds=3, failure_confirm_seconds=2, max_restarts=0)
    return KubernetesLaunchConfig(**{**base, **overrides})


def _cmd(mode: str = "ok") -> StageCommand:
    return StageCommand(stage="pretrain", args=[], env={"FAKE_MODE": mode}, run_id="pending-run")


def _fails(standin, cfg: KubernetesLaunchConfig, error: type, what: str):
    """Run the stage, expect `error`; check nothing is left behind (bench/k8s_eviction.py times it)."""
    launcher, log = KubernetesLauncher(cfg, standin.api_client()), Lines()
    with pytest.raises(error) as caught:
        launcher.run(_cmd(), log)
    message = str(caught.value)
    assert type(caught.value) is error and "\n" not in message, message
    assert message.endswith(f"Job {NS}/{launcher.job_name} deleted"), message
    wait_for(lambda: not standin.jobs() and not standin.pods(), "Job and pods gone", 30)
    return message, log.text()


# The launcher's own defaults (poll 2 s, confirmation 5 s), for the two measured figures.
DEFAULT_TIMING = dict(poll_seconds=2.0, failure_confirm_seconds=5.0)


# ---- can never start: named in seconds ---------------------------------------------------------------

@pytest.mark.parametrize("standin", [{"pull_seconds": 30.0}], indirect=True)  # the cluster's pull delay
def test_an_unpullable_image_fails_in_seconds_naming_pod_reason_and_message(standin, tmp_path):
    cfg = _cfg(tmp_path, nodes=2, image="registry.example/no-such-image:1", **DEFAULT_TIMING)
    message, log = _fails(standin, cfg, StageCannotStart, "unpullable image")
    assert re.match(r"pretrain: rank [01] \(pod pretrain-\S+\) cannot start: (ErrImagePull|ImagePullBackOff): ", message)
    assert "not found" in message and "registry.example/no-such-image:1" in message, message
    assert "cannot start: ErrImagePull" in log  # said while confirming


def test_an_invalid_image_reference_fails_in_seconds(standin, tmp_path):
    # What Prefect once made of a digest reference: name:sha256:<hex>.
    cfg = _cfg(tmp_path, image=f"registry.example/pipeline:sha256:{'0' * 64}")
    message, _ = _fails(standin, cfg, StageCannotStart, "invalid image reference")
    assert "rank 0" in message and "InvalidImageName" in message and "invalid reference format" in message, message


@pytest.mark.parametrize("standin", [{"private_registries": {"registry.example"}}], indirect=True)
def test_a_private_registry_needs_the_pull_secret_and_runs_with_it(standin, tmp_path):
    message, _ = _fails(standin, _cfg(tmp_path), StageCannotStart, "private registry, no pull secret")
    assert re.search(r"cannot start: (ErrImagePull|ImagePullBackOff)", message) and "401 Unauthorized" in message
    config = json.dumps({"auths": {"registry.example": {"auth": base64.b64encode(b"u:p").decode()}}})
    k8s.CoreV1Api(standin.api_client()).create_namespaced_secret(NS, k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="registry"), type="kubernetes.io/dockerconfigjson",
        string_data={".dockerconfigjson": config}))
    launcher = KubernetesLauncher(_cfg(tmp_path, image_pull_secrets=["registry"]), standin.api_client())
    assert launcher.run(_cmd(), Lines()) == 0


@pytest.mark.parametrize("standin", [{"pool_gpus": 1, "provision_seconds": 30.0}], indirect=True)
def test_a_gpu_request_no_node_pool_fits_fails_on_not_trigger_scale_up(standin, tmp_path):
    cfg = _cfg(tmp_path, nodes=2, gpus_per_node=8, **DEFAULT_TIMING)
    message, _ = _fails(standin, cfg, StageCannotStart, "unsatisfiable GPU request (NotTriggerScaleUp)")
    assert re.match(r"pretrain: rank [01] \(pod \S+\) cannot start: 0/1 nodes are available: 1 Insufficient "
                    r"nvidia\.com/gpu.*\(Unschedulable; no scale-up possible, NotTriggerScaleUp: pod didn't trigger "
                    r"scale-up", message), message


def test_unschedulable_without_any_autoscaler_fails_after_the_grace(standin, tmp_path):
    cfg = _cfg(tmp_path, gpus_per_node=1, scale_up_grace_seconds=3)
    message, _ = _fails(standin, cfg, StageCannotStart, "unschedulable, no autoscaler (grace 3 s)")
    assert "Insufficient nvidia.com/gpu" in message and "no cluster-autoscaler scale-up within 3 s" in message


def test_a_missing_secret_fails_in_seconds(standin, tmp_path):
    cfg = _cfg(tmp_path, env_from_secret="no-such-secret")
    message, _ = _fails(standin, cfg, StageCannotStart, "missing Secret")
    assert 'cannot start: CreateContainerConfigError: secret "no-such-secret" not found' in message, message


# ---- on its way: its own limit -----------------------------------------------------------------------

PULL = {"pull_seconds": 6.0, "pull_per_pod": True}
SCALE_UP = {"pool_gpus": 1, "provision_seconds": 6.0}


@pytest.mark.parametrize("standin, gpus, reason", [(PULL, 0, "ContainerCreating"), (SCALE_UP, 1, "TriggeredScaleUp")],
                         indirect=["standin"], ids=["pull", "scale-up"])
def test_a_pull_or_a_scale_up_longer_than_the_pending_limit_still_runs(standin, tmp_path, gpus, reason):
    cfg = _cfg(tmp_path, nodes=2 if not gpus else 1, gpus_per_node=gpus, pending_timeout_seconds=2,
               startup_timeout_seconds=60)
    launcher, log = KubernetesLauncher(cfg, standin.api_client()), Lines()
    assert launcher.run(_cmd("rendezvous" if not gpus else "ok"), log) == 0
    assert re.search(rf"rank 0 \(pod \S+\) starting \(\d+ s of at most 60 s\): .*{reason}", log.text()), log.text()
    pod = next(iter(standin.cluster.pods.values()))
    assert pod.env["PIPELINE_RENDEZVOUS_TIMEOUT_S"] == "180"  # preflight's wait for rank 0 follows the limit


@pytest.mark.parametrize("standin, gpus, reason", [
    ({"pull_seconds": 60.0}, 0, r"ContainerCreating: Pulling image \"registry\.example/pipeline-fakes:test\""),
    ({"pool_gpus": 1, "provision_seconds": 60.0}, 1, r"TriggeredScaleUp: pod triggered scale-up")],
    indirect=["standin"], ids=["pull", "scale-up"])
def test_a_start_past_the_startup_limit_fails_naming_what_it_was_doing(standin, tmp_path, gpus, reason):
    cfg = _cfg(tmp_path, gpus_per_node=gpus, startup_timeout_seconds=4)
    message, _ = _fails(standin, cfg, StagePendingTimeout, f"startup limit 4 s, {'scale-up' if gpus else 'pull'}")
    assert re.match(rf"pretrain: rank 0 \(pod \S+\) still starting after 4 s \(startup_timeout_seconds\): .*{reason}",
                    message), message


# ---- queued by Kueue -------------------------------------------------------------------------------------

def test_a_job_kueue_never_admits_fails_after_the_admission_limit(standin, tmp_path):
    cfg = _cfg(tmp_path, queue_name="gpu-h100", admission_timeout_seconds=3)
    message, log = _fails(standin, cfg, StageNotAdmitted, "never admitted (limit 3 s)")
    assert re.match(r"pretrain: Job pretrain-\S+ was not admitted by Kueue \(LocalQueue gpu-h100\) within 3 s "
                    r"\(admission_timeout_seconds\)", message), message
    assert re.search(r"Job \S+ queued \(LocalQueue gpu-h100\): suspended until Kueue admits it", log)


def test_a_job_admitted_while_queued_runs(standin, tmp_path):
    cfg = _cfg(tmp_path, queue_name="gpu-h100", admission_timeout_seconds=60)
    launcher, log = KubernetesLauncher(cfg, standin.api_client()), Lines()
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(code=launcher.run(_cmd(), log)))
    thread.start()
    wait_for(lambda: "queued" in log.text(), "the queued line", 30)
    time.sleep(1.5)
    assert not standin.pods()  # suspended: no pod until admitted
    k8s.BatchV1Api(standin.api_client()).patch_namespaced_job(  # what Kueue does on admission
        launcher.job_name, NS, {"spec": {"suspend": False}}, _content_type="application/merge-patch+json")
    thread.join(60)
    assert outcome.get("code") == 0, log.text()
    assert re.search(r"Job \S+ admitted after \d+ s in the queue", log.text())


# ---- the settings GPU clusters need ----------------------------------------------------------------------

PROBE = ("import os, socket, aiobotocore.session as b; s = b.get_session(); "  # s3fs's session
         "print('checksum', s.get_config_variable('request_checksum_calculation'), "
         "s.get_config_variable('response_checksum_validation'), 'nccl', os.environ.get('NCCL_DEBUG'), "
         "'master', os.environ['MASTER_ADDR'], socket.gethostbyname(os.environ['MASTER_ADDR']))")


@pytest.mark.parametrize("standin", [{"cluster_domain": "k8s.example"}], indirect=True)
def test_extra_env_and_the_cluster_domain_reach_the_pods(standin, tmp_path):
    cfg = _cfg(tmp_path, nodes=2, cluster_domain="k8s.example", extra_env={
        "NCCL_DEBUG": "INFO", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"})
    launcher, log = KubernetesLauncher(cfg, standin.api_client()), Lines()
    assert launcher.run(_cmd("rendezvous"), log) == 0  # MASTER_ADDR in the cluster's own domain resolves
    assert f"{launcher.job_name}-0.{launcher.job_name}.{NS}.svc.k8s.example" in log.text()
    probe = KubernetesLauncher(_cfg(tmp_path, command=["python", "-c", PROBE], cluster_domain="k8s.example",
                                    extra_env=cfg.extra_env), standin.api_client())
    lines = Lines()
    assert probe.run(_cmd(), lines) == 0, lines.text()
    # The image's aiobotocore/botocore (>= 1.36), as s3fs uses it, reads both settings from the pod's env.
    assert re.search(r"\[rank 0\] checksum when_required when_required nccl INFO master \S+k8s\.example 10\.",
                     lines.text()), lines.text()


def test_an_unknown_runtime_class_fails_in_seconds_and_leaves_no_job(standin, tmp_path):
    # No pod is ever created: the admission plugin refuses it, the Job controller says so on the Job.
    cfg = _cfg(tmp_path, runtime_class_name="no-such-runtime")
    message, _ = _fails(standin, cfg, StageCannotStart, "unknown runtime class")
    assert "FailedCreate" in message and 'RuntimeClass "no-such-runtime" not found' in message, message
