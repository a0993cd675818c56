"""The shape of one stage's Kubernetes Job: the overlay decides, the user may override explicitly.

    base = KubernetesLaunchConfig.from_env()                 # ConfigMap training-launch (base + overlay)
    cfg = stage_launch_config(base, "pretrain", user_overrides(params.overrides()))

Pure functions, no API calls: the flow (`flows/stage_task.py:make_launcher`) and
`pipeline k8s render` both use them, so what `render` prints is what the flow submits.

Rules (the launch ConfigMap is the source of truth; params.yaml's trainer section is not
consulted, since it describes a laptop run):

* **Training stages** (`pretrain`, `finetune`) take `nodes`, `gpus_per_node`, `node_selector`,
  `tolerations` and the resources from the overlay. Only keys the user set explicitly (flow
  parameters `num_nodes`, `devices`, `accelerator`, which the flow turns into
  `trainer.num_nodes`, `trainer.devices`, `trainer.accelerator`, or the same keys via `--set`)
  change them:

  - `trainer.num_nodes=N` -> `nodes=N` (pods are scale-out: any N >= 1).
  - overlay with GPUs: `trainer.devices=G` -> `gpus_per_node=G` for G <= the overlay's
    `gpus_per_node` (the GPUs of the node type its `node_selector` picks); more is a conflict.
    `trainer.accelerator=cpu|mps` is a conflict (the pods get GPUs).
  - overlay without GPUs: `trainer.accelerator=gpu|cuda` asks for `trainer.devices` GPUs per pod
    (default 1) with the overlay's placement as it is; otherwise each pod runs one CPU process,
    so `trainer.devices` > 1 is a conflict (use `trainer.num_nodes`).
  - `trainer.accelerator=auto` or unset: follow the overlay.
  - the same key given twice with different values (e.g. flow parameter `num_nodes=2` and
    `--set trainer.num_nodes=4`) is a conflict.

* **Single-process stages** (`prepare`, `evaluate`) get the overlay's `light` profile: 1 node, no
  GPUs, `light.node_selector`/`light.tolerations` (default none: no GPU node is held for them)
  and `light.*` resources and runtime class (`light.runtime_class_name`, default none: the training
  pods' `runtime_class_name` would pin them to GPU nodes). `extra_env`, `cluster_domain` and the
  start-up limits apply to every stage. The user's trainer keys do not apply to them.

Conflicts raise ConfigError (exit 2, never retried by the flow) naming both values, before any
Job is created: the flow shapes every training stage up front, before prepare's Job.
"""
from __future__ import annotations

from typing import Any

from pipeline.params import parse_override
from pipeline.errors import ConfigError
from pipeline.launch.k8s_manifests import new_job_name, render_job, render_service
from pipeline.launch.k8s_settings import KubernetesLaunchConfig
from pipeline.launch.k8s_settings import PodResources

TRAINING_STAGES = ("pretrain", "finetune")
"""Multi-process (DDP) stages; every other stage is single-process and runs on the light profile."""
SHAPE_KEYS = ("trainer.num_nodes", "trainer.devices", "trainer.accelerator")
GPU_ACCELERATORS = ("gpu", "cuda")


def user_overrides(items: list[str]) -> dict[str, Any]:
    """The user's `key.path=value` overrides (flow parameters first, then `--set`/extra_overrides) as
    {dotted key: value}. A shape key given twice with different values is a ConfigError."""
    result: dict[str, Any] = {}
    problems = []
    for item in items:
        path, value = parse_override(item)
        key = ".".join(path)
        if key in SHAPE_KEYS and key in result and result[key] != value:
            problems.append(f"{key}={result[key]} and {key}={value} are both given (flow parameter and --set?); "
                            "keep one")
        result[key] = value
    if problems:
        raise ConfigError(problems)
    return result


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r}: expected an integer >= 1")
    return value


def light_config(base: KubernetesLaunchConfig) -> KubernetesLaunchConfig:
    """The single-process profile: one pod, no GPUs, the overlay's `light` placement, resources and runtime class."""
    light = base.light.model_copy(deep=True)  # the result's placement is its own, not shared with `base.light`
    return base.model_copy(update={"nodes": 1, "gpus_per_node": 0,
                                   **{name: getattr(light, name) for name in PodResources.model_fields}})


def stage_launch_config(base: KubernetesLaunchConfig, stage: str,
                        user_overrides: dict[str, Any]) -> KubernetesLaunchConfig:
    """The launch config of `stage`: `base` (ConfigMap: base + overlay) shaped by the module's rules.

    `user_overrides`: only what the user set explicitly ({"trainer.num_nodes": 4, ...}, see
    user_overrides()); keys other than SHAPE_KEYS are ignored. Raises ConfigError naming both values
    when the user's request contradicts the overlay.
    """
    if stage not in TRAINING_STAGES:
        return light_config(base)
    nodes, devices = user_overrides.get("trainer.num_nodes"), user_overrides.get("trainer.devices")
    accelerator = user_overrides.get("trainer.accelerator")
    update: dict[str, Any] = {}
    if nodes is not None:
        update["nodes"] = _count("trainer.num_nodes", nodes)
    if devices is not None:
        devices = _count("trainer.devices", devices)
    overlay_gpus = base.gpus_per_node
    problems = []
    if overlay_gpus:
        if accelerator in ("cpu", "mps"):
            problems.append(f"trainer.accelerator={accelerator} (flow) conflicts with the overlay's "
                            f"gpus_per_node={overlay_gpus}: its pods get GPUs; drop trainer.accelerator or use an "
                            "overlay without GPUs (k8s/overlays/dev)")
        elif devices is not None and devices > overlay_gpus:
            problems.append(f"trainer.devices={devices} (flow) conflicts with the overlay's gpus_per_node="
                            f"{overlay_gpus}: its nodes have {overlay_gpus} GPU(s); use trainer.num_nodes to scale out")
        elif devices is not None:
            update["gpus_per_node"] = devices
    elif accelerator in GPU_ACCELERATORS:
        update["gpus_per_node"] = devices or 1
    elif devices is not None and devices > 1:
        problems.append(f"trainer.devices={devices} (flow) conflicts with the overlay's gpus_per_node=0: without "
                        "GPUs each pod runs one process; use trainer.num_nodes, or an overlay with GPUs")
    if problems:
        raise ConfigError(problems)
    return base.model_copy(update=update)


def set_args(overrides: list[str]) -> list[str]:
    """What pods get of the flow's params: each override as `--set key=value` (they run the image's
    params.yaml, not the flow's workspace)."""
    return [arg for item in overrides for arg in ("--set", item)]


def render_stage(base: KubernetesLaunchConfig, stage: str, overrides: list[str], run_id: str,
                 owner: dict | None = None) -> list[dict]:
    """[Job, Service] as the launcher submits them for `stage` (a fresh job name; the Service's ownerReference to
    the Job is added by the launcher once the API has given the Job its uid). A flow's pods get the run's params
    file as `--params <uri>`; here `overrides` stand in for it as `--set` args."""
    cfg = stage_launch_config(base, stage, user_overrides(overrides))
    job_name = new_job_name(stage, run_id)
    return [render_job(cfg, job_name, stage, set_args(overrides), run_id, {}, owner),
            render_service(cfg, job_name, stage, run_id)]
