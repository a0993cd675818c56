"""`pipeline k8s render`: the objects the launcher would submit for a stage, printed without a cluster."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline.launch.k8s_manifests import K8S_SCHEMA_VERSION
from pipeline.params import load_config

ROOT = Path(__file__).resolve().parents[2]
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "k8s", "render", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def objects(*args: str) -> tuple[dict, dict]:
    done = render(*args)
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    assert [d["kind"] for d in docs] == ["Job", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
    return docs[0], docs[1]


def test_pretrain_on_the_gpu_overlay_is_two_nodes_of_eight_gpus():
    job, svc = objects("pretrain", "--overlay", "k8s/overlays/gpu", "--run-id", "run-42",
                       "--set", "pretrain.epochs=3")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"] == container["resources"]["limits"]  # guaranteed_qos
    assert pod["nodeSelector"] == H100 and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    args = container["args"]
    assert args[:3] == ["pretrain", "--set", "pretrain.epochs=3"]
    assert {"trainer.num_nodes=2", "trainer.devices=8", "trainer.accelerator=gpu"} <= set(args)
    shape = [value for flag, value in zip(args, args[1:]) if flag == "--set" and value.startswith("trainer.")]
    assert load_config(None, shape).trainer.strategy == "ddp"  # DDP follows from the config's own rule
    assert job["metadata"]["labels"]["pipeline.example/flow-run-id"] == "run-42"
    assert svc["metadata"]["name"] == job["metadata"]["name"] == pod["subdomain"]


def test_prepare_gets_the_light_profile():
    job, _ = objects("prepare", "--overlay", "k8s/overlays/gpu")
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["completions"] == 1
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}


def test_user_settings_and_base_only():
    job, _ = objects("finetune", "--overlay", "k8s/overlays/gpu", "--set", "trainer.num_nodes=4")
    assert job["spec"]["completions"] == 4
    job, _ = objects("pretrain")  # base alone: one CPU pod
    assert job["spec"]["completions"] == 1
    assert "nvidia.com/gpu" not in job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_cluster_conventions_from_an_overlay(tmp_path):
    overlay = tmp_path / "kueue"
    overlay.mkdir()
    settings = json.loads((ROOT / "k8s/overlays/gpu/launch.json").read_text())
    settings.update(queue_name="gpu-h100", priority_class_name="training-high", image_pull_secrets=["registry"],
                    extra_labels={"team": "vision"}, extra_annotations={"example.com/cost-center": "ml 42"})
    (overlay / "launch.json").write_text(json.dumps(settings))
    job, svc = objects("pretrain", "--overlay", str(overlay))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-h100" and job["spec"]["suspend"] is True
    pod = job["spec"]["template"]
    assert pod["spec"]["priorityClassName"] == "training-high"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["metadata"]["labels"]["team"] == svc["metadata"]["labels"]["team"] == "vision"
    assert pod["metadata"]["annotations"] == job["metadata"]["annotations"] == {"example.com/cost-center": "ml 42"}


@pytest.mark.parametrize("args, named", [
    (["pretrain", "--overlay", "k8s/overlays/gpu", "--set", "trainer.devices=16"],
     ["trainer.devices=16", "gpus_per_node=8"]),
    (["pretrain", "--overlay", "k8s/overlays/gpu", "--set", "trainer.accelerator=cpu"],
     ["trainer.accelerator=cpu", "gpus_per_node=8"]),
], ids=["devices", "accelerator"])
def test_conflicts_exit_2_naming_both_values(args, named):
    done = render(*args)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    for text in named:
        assert text in done.stderr


@pytest.mark.parametrize("settings, named", [
    ({"nodez": 2}, "launch.json: nodez: unknown key"),
    ({"image": "registry.example/pipeline:latest"}, "launch.json: image:"),
    ({"queue_name": "not a label!"}, "launch.json: queue_name:"),
    ({"extra_labels": {"pipeline.example/stage": "x"}}, "launch.json: extra_labels:"),
    ({"guaranteed_qos": True, "cpu_request": "1", "cpu_limit": "2"}, "cpu_request '1' differs from cpu_limit '2'"),
], ids=["unknown", "unpinned", "queue", "reserved-label", "qos"])
def test_bad_launch_settings_exit_2_naming_the_key(tmp_path, capsys, monkeypatch, settings, named):
    from pipeline.cli import main  # in-process: the subprocess path is covered above

    monkeypatch.chdir(ROOT)
    (tmp_path / "launch.json").write_text(json.dumps(settings))
    assert main(["k8s", "render", "pretrain", "--overlay", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert named in err and out == ""
