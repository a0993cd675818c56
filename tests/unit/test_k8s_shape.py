"""The shape of a stage's Job: the overlay decides, explicit user settings override, conflicts exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.params import apply_overrides, build_config, read_params
from pipeline.launch.k8s_manifests import render_job
from pipeline.launch.k8s_settings import KubernetesLaunchConfig
from pipeline.launch.shape import set_args, stage_launch_config, user_overrides

K8S = Path(__file__).resolve().parents[2] / "k8s"


def _overlay(name: str) -> KubernetesLaunchConfig:
    layers = [("base", json.loads((K8S / "base" / "launch-base.json").read_text())),
              (name, json.loads((K8S / "overlays" / name / "launch.json").read_text()))]
    return KubernetesLaunchConfig.from_layers(layers)


GPU = _overlay("gpu")
DEV = _overlay("dev")
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def _shape(base, stage, *items):
    return stage_launch_config(base, stage, user_overrides(list(items)))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_gpu_overlay_without_user_params_gives_its_shape(stage):
    cfg = _shape(GPU, stage)
    assert (cfg.nodes, cfg.gpus_per_node, cfg.node_selector) == (2, 8, H100)
    assert [t.key for t in cfg.tolerations] == ["nvidia.com/gpu"]
    assert (cfg.cpu_limit, cfg.memory_limit) == ("64", "512Gi")
    container = render_job(cfg, "pretrain-x-1", stage, [], "r")["spec"]["template"]["spec"]["containers"][0]
    assert {"trainer.num_nodes=2", "trainer.devices=8", "trainer.accelerator=gpu"} <= set(container["args"])
    assert container["resources"]["requests"] == container["resources"]["limits"]  # Guaranteed QoS


@pytest.mark.parametrize("stage", ["prepare", "evaluate"])
@pytest.mark.parametrize("items", [(), ("trainer.num_nodes=4", "trainer.devices=8", "trainer.accelerator=gpu")])
def test_single_process_stages_get_the_light_profile(stage, items):
    cfg = _shape(GPU, stage, *items)
    assert (cfg.nodes, cfg.gpus_per_node, cfg.node_selector, cfg.tolerations) == (1, 0, {}, [])
    assert (cfg.cpu_request, cfg.cpu_limit, cfg.memory_request, cfg.memory_limit) == ("1", "2", "2Gi", "4Gi")
    pod = render_job(cfg, "prepare-x-1", stage, [], "r")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_light_profile_is_overridable_from_the_overlay():
    base = GPU.model_validate({**GPU.model_dump(), "light": {"cpu_limit": "4", "tolerations": [{"key": "pool"}]}})
    cfg = _shape(base, "prepare")
    assert (cfg.cpu_request, cfg.cpu_limit, [t.key for t in cfg.tolerations]) == ("1", "4", ["pool"])


def test_explicit_user_settings_override_the_overlay():
    assert _shape(GPU, "pretrain", "trainer.num_nodes=4").nodes == 4
    cfg = _shape(GPU, "pretrain", "trainer.num_nodes=1", "trainer.devices=4", "trainer.accelerator=gpu")
    assert (cfg.nodes, cfg.gpus_per_node, cfg.node_selector) == (1, 4, H100)
    assert _shape(GPU, "pretrain", "trainer.accelerator=auto").gpus_per_node == 8
    # Other keys never change the shape.
    assert _shape(GPU, "pretrain", "pretrain.epochs=3", "data.version=abc") == GPU


def test_flow_parameters_on_a_cpu_overlay():
    # What tests/integration/test_k8s_flow.py runs: no overlay, num_nodes=2, devices=1, accelerator=cpu.
    base = KubernetesLaunchConfig()
    cfg = _shape(base, "pretrain", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2")
    assert (cfg.nodes, cfg.gpus_per_node) == (2, 0)
    assert _shape(base, "prepare", "trainer.num_nodes=2").nodes == 1
    assert (_shape(DEV, "pretrain").nodes, _shape(DEV, "pretrain").gpus_per_node) == (2, 0)
    # accelerator=gpu on an overlay without GPUs asks for `devices` GPUs per pod (default 1).
    assert _shape(DEV, "pretrain", "trainer.accelerator=gpu").gpus_per_node == 1
    assert _shape(DEV, "pretrain", "trainer.accelerator=gpu", "trainer.devices=2").gpus_per_node == 2


@pytest.mark.parametrize("base, items, named", [
    (GPU, ["trainer.devices=16"], ["trainer.devices=16", "gpus_per_node=8"]),
    (GPU, ["trainer.accelerator=cpu"], ["trainer.accelerator=cpu", "gpus_per_node=8"]),
    (DEV, ["trainer.devices=4"], ["trainer.devices=4", "gpus_per_node=0"]),
    (GPU, ["trainer.num_nodes=2", "trainer.num_nodes=4"], ["trainer.num_nodes=2", "trainer.num_nodes=4"]),
], ids=["devices>overlay", "cpu-with-gpus", "devices-without-gpus", "num_nodes-twice"])
def test_conflicts_are_config_errors_naming_both_values(base, items, named):
    with pytest.raises(ConfigError) as caught:
        _shape(base, "pretrain", *items)
    for text in named:
        assert text in str(caught.value)


def test_flow_parameter_conflict_fails_before_any_job(monkeypatch):
    from flows.parameters import TrainingParameters
    from flows.stage_task import kubernetes_launch_config

    monkeypatch.setenv("PIPELINE_K8S_CONFIG", (K8S / "base" / "launch-base.json").read_text())
    monkeypatch.setenv("PIPELINE_K8S_OVERRIDES", (K8S / "overlays" / "gpu" / "launch.json").read_text())
    params = TrainingParameters(launcher="kubernetes", extra_overrides=["trainer.devices=16"])
    with pytest.raises(ConfigError, match="trainer.devices=16.*gpus_per_node=8"):
        kubernetes_launch_config(params, "pretrain")
    assert kubernetes_launch_config(TrainingParameters(launcher="kubernetes"), "pretrain").gpus_per_node == 8
    assert kubernetes_launch_config(TrainingParameters(launcher="kubernetes", num_nodes=4), "finetune").nodes == 4
    assert kubernetes_launch_config(TrainingParameters(launcher="kubernetes", num_nodes=4), "prepare").nodes == 1


def test_pods_get_every_override_as_set_args():
    assert set_args(["a.b=1", "data.version=abc"]) == ["--set", "a.b=1", "--set", "data.version=abc"]


def test_bad_launch_settings_name_the_source_and_key(monkeypatch):
    monkeypatch.setenv("PIPELINE_K8S_CONFIG", '{"namespace": "ml"}')
    monkeypatch.setenv("PIPELINE_K8S_OVERRIDES", '{"nodez": 2, "image": "registry.example/pipeline:latest"}')
    with pytest.raises(ConfigError) as caught:
        KubernetesLaunchConfig.from_env()
    assert "$PIPELINE_K8S_OVERRIDES: nodez: unknown key" in str(caught.value)
    assert "$PIPELINE_K8S_OVERRIDES: image:" in str(caught.value) and "pinned" in str(caught.value)
    monkeypatch.setenv("PIPELINE_K8S_OVERRIDES", "{nope")
    with pytest.raises(ConfigError, match="PIPELINE_K8S_OVERRIDES: not valid JSON"):
        KubernetesLaunchConfig.from_env()


def test_pods_get_the_data_version_pin_but_keep_the_remote_source():
    from flows.parameters import TrainingParameters
    from flows.versioning import pin_data

    source = "s3://bucket/images"
    params = TrainingParameters(launcher="kubernetes", data_source=source)
    local, pods = pin_data(params, {"source": source, "data_version": "abc123", "snapshot": "data/source.dvc"})
    assert local == ["data.version=abc123", "data.source=data/source"]  # the workspace reads the snapshot
    assert pods == ["data.version=abc123"]  # pods keep the remote source the form named
    raw = apply_overrides(read_params(Path(__file__).resolve().parents[2] / "params.yaml"), [*params.overrides(), *pods])
    assert (build_config(raw).data.source, build_config(raw).data.version) == (source, "abc123")
    builtin = TrainingParameters(launcher="kubernetes")
    assert pin_data(builtin, {"source": "builtin:digits", "data_version": "x", "snapshot": None}) == ([], [])
    with pytest.raises(ConfigError, match="data.source: '/data/images'"):
        pin_data(params.model_copy(update={"data_source": "/data/images"}), {"source": "/data/images",
                                                                           "data_version": "abc123"})
