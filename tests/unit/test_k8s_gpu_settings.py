"""What GPU clusters need on stage pods, from the launch settings: extra env, runtimeClassName, the cluster
domain, and the start-up limits (preflight's wait for rank 0 follows startup_timeout_seconds)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import kubernetes_validate
import pytest

from pipeline.config import TrainerConfig
from pipeline.errors import ConfigError
from pipeline.launch.k8s_manifests import (
    K8S_SCHEMA_VERSION, master_addr, render_job,
)
from pipeline.launch.k8s_settings import LAUNCHER_ENV, KubernetesLaunchConfig
from pipeline.launch.shape import render_stage, stage_launch_config
from pipeline.preflight import PreflightError, check_distributed, rendezvous_timeout

K8S = Path(__file__).resolve().parents[2] / "k8s"
GPU = KubernetesLaunchConfig(
    namespace="train", image="registry.example/pipeline:1.2.3", nodes=2, gpus_per_node=8,
    runtime_class_name="nvidia", cluster_domain="k8s.example.internal", startup_timeout_seconds=900,
    extra_env={"NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "INFO", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
               "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"})


def _pod(cfg: KubernetesLaunchConfig, env: dict | None = None) -> dict:
    return render_job(cfg, "pretrain-run-abc123", "pretrain", [], "run", env or {})["spec"]["template"]["spec"]


def _env(pod: dict) -> dict:
    (container,) = pod["containers"]
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names))  # one entry per name: nothing hides another
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("version", [K8S_SCHEMA_VERSION, "1.37.0"])
def test_gpu_settings_validate_strictly(version):
    kubernetes_validate.validate(render_job(GPU, "pretrain-run-abc123", "pretrain", [], "run"), version, strict=True)


def test_extra_env_runtime_class_and_cluster_domain_are_rendered():
    pod = _pod(GPU)
    env = _env(pod)
    assert pod["runtimeClassName"] == "nvidia"
    assert {k: env[k] for k in GPU.extra_env} == GPU.extra_env
    assert env["MASTER_ADDR"] == "pretrain-run-abc123-0.pretrain-run-abc123.train.svc.k8s.example.internal"
    assert env["MASTER_ADDR"] == master_addr("pretrain-run-abc123", "train", "k8s.example.internal")
    assert master_addr("j", "ns") == "j-0.j.ns.svc.cluster.local"  # the default domain
    plain = _pod(KubernetesLaunchConfig())
    assert "runtimeClassName" not in plain and _env(plain)["MASTER_ADDR"].endswith(".svc.cluster.local")


def test_the_commands_env_wins_over_extra_env_and_the_launchers_over_both():
    env = _env(_pod(GPU, {"NCCL_DEBUG": "WARN", "MASTER_PORT": "1"}))
    assert env["NCCL_DEBUG"] == "WARN" and env["MASTER_PORT"] == "29500"


def test_preflight_wait_for_rank_0_follows_the_startup_limit(monkeypatch):
    assert _env(_pod(GPU))["PIPELINE_RENDEZVOUS_TIMEOUT_S"] == "1020"  # 900 s to start + 120 s of process start-up
    assert _env(_pod(KubernetesLaunchConfig()))["PIPELINE_RENDEZVOUS_TIMEOUT_S"] == "1920"
    monkeypatch.delenv("PIPELINE_RENDEZVOUS_TIMEOUT_S", raising=False)
    assert rendezvous_timeout() == 120
    monkeypatch.setenv("PIPELINE_RENDEZVOUS_TIMEOUT_S", "1020")
    assert rendezvous_timeout() == 1020  # read when preflight runs, not when it is imported
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name, value in (("NODE_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)),
                        ("PIPELINE_RENDEZVOUS_TIMEOUT_S", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(PreflightError, match=rf"rendezvous 127.0.0.1:{port} unreachable after 1s"):
        check_distributed(TrainerConfig(num_nodes=2, strategy="ddp"))


def test_light_stages_keep_extra_env_and_domain_but_not_the_gpu_runtime_class():
    light = stage_launch_config(GPU, "prepare", {})
    pod = _pod(light)
    assert "runtimeClassName" not in pod and _env(pod)["NCCL_DEBUG"] == "INFO"
    assert _env(pod)["MASTER_ADDR"].endswith(".svc.k8s.example.internal")
    own = KubernetesLaunchConfig(**{**GPU.model_dump(), "light": {"runtime_class_name": "gvisor"}})
    assert _pod(stage_launch_config(own, "evaluate", {}))["runtimeClassName"] == "gvisor"
    assert _pod(stage_launch_config(own, "pretrain", {}))["runtimeClassName"] == "nvidia"
    job, _ = render_stage(GPU, "finetune", [], "run")
    assert job["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"


@pytest.mark.parametrize("name", LAUNCHER_ENV)
def test_extra_env_may_not_set_what_the_launcher_sets(name):
    with pytest.raises(ValueError, match=rf"extra_env: {name} is set by the launcher on every stage pod"):
        KubernetesLaunchConfig(extra_env={name: "x"})


@pytest.mark.parametrize("settings, message", [
    ({"extra_env": {"1NCCL": "x"}}, "'1NCCL' is not a valid environment variable name"),
    ({"extra_env": {"A=B": "x"}}, "not a valid environment variable name"),
    ({"extra_env": {"NCCL_DEBUG": 3}}, "valid string"),
    ({"extra_env": ["NCCL_DEBUG=INFO"]}, "valid dictionary"),
    ({"runtime_class_name": "NVIDIA"}, "runtime_class_name 'NVIDIA' is not a valid object name"),
    ({"light": {"runtime_class_name": "a_b"}}, r"light.runtime_class_name\n.*runtime_class_name 'a_b' is not a valid object name"),
    ({"cluster_domain": "Cluster.Local"}, "cluster_domain 'Cluster.Local' is not a valid object name"),
    ({"cluster_domain": ".local"}, "not a valid object name"),
    ({"startup_timeout_seconds": 0}, "greater than 0"),
    ({"admission_timeout_seconds": -1}, "greater than 0"),
    ({"failure_confirm_seconds": -1}, "greater than or equal to 0"),
    ({"scale_up_grace_seconds": -1}, "greater than or equal to 0"),
])
def test_gpu_settings_are_validated(settings, message):
    with pytest.raises(ValueError, match=message):
        KubernetesLaunchConfig(**settings)


def test_a_reserved_env_name_in_an_overlay_names_the_file_and_key():
    with pytest.raises(ConfigError) as caught:
        KubernetesLaunchConfig.from_layers([("k8s/base/launch-base.json", {}),
                                            ("k8s/overlays/gpu/launch.json", {"extra_env": {"NODE_RANK": "0"}})])
    assert "k8s/overlays/gpu/launch.json: extra_env: extra_env: NODE_RANK is set by the launcher" in str(caught.value)


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_the_shipped_launch_settings_give_the_documented_limits(overlay):
    layers = [(name, json.loads(path.read_text())) for name, path in
              (("base", K8S / "base" / "launch-base.json"), (overlay, K8S / "overlays" / overlay / "launch.json"))]
    cfg = KubernetesLaunchConfig.from_layers(layers)
    assert (cfg.pending_timeout_seconds, cfg.startup_timeout_seconds, cfg.admission_timeout_seconds) == (300, 1800, 3600)
    assert cfg.cluster_domain == "cluster.local" and cfg.runtime_class_name is None and cfg.extra_env == {}
