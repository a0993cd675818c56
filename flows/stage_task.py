"""The stage task: restore a stage from a cache, or launch `python -m pipeline <stage>` and record it.

A launcher runs the command (a local subprocess, or an indexed Job on Kubernetes); the task turns its
exit code into a retry decision (exit 2: never retried) and its progress lines into live artifacts.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.states import Completed, State

from flows import stage_cache
from flows import workspace as wsmod
from flows.parameters import TrainingParameters
from flows.progress import StageProgress
from pipeline.params import load_config
from pipeline.errors import EXIT_SIGTERM, EXIT_USER_ERROR, ConfigError, UserInputError
from pipeline.launch import StageCommand
from pipeline.launch.k8s_api import KubernetesLaunchError
from pipeline.launch.local import LocalLauncher


def parallel_stages() -> int:
    """How many stages may compute at once (PIPELINE_PARALLEL_STAGES, default 2: prepare and corpus together)."""
    text = os.environ.get("PIPELINE_PARALLEL_STAGES") or "2"
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"PIPELINE_PARALLEL_STAGES={text!r}: expected a whole number >= 1")
    return int(text)


_STAGE_SLOTS = threading.BoundedSemaphore(parallel_stages())


class StageInputError(Exception):
    """The stage exited 2: bad configuration or data. Retrying cannot help."""


class StageInfraError(Exception):
    """The stage failed for another reason (crash, lost node, OOM): worth a retry."""


def _retry_infra_only(task, task_run, state) -> bool:
    try:
        state.result()
    except (StageInputError, KubernetesLaunchError, UserInputError):
        return False  # bad input, RBAC (403) or an invalid object (422): the same request fails again
    except Exception:
        return True
    return False


def kubernetes_launch_config(params: TrainingParameters, stage: str):
    """The stage's KubernetesLaunchConfig. The launch ConfigMap (PIPELINE_K8S_CONFIG + PIPELINE_K8S_OVERRIDES)
    decides nodes, GPUs, placement and resources; only what the user set explicitly (num_nodes, devices,
    accelerator, or those trainer keys via extra_overrides) changes it, and prepare/evaluate get the light
    profile. Rules: pipeline/launch/shape.py. A conflict with the overlay is a ConfigError (exit 2)."""
    from pipeline.launch.k8s_settings import KubernetesLaunchConfig
    from pipeline.launch.shape import stage_launch_config, user_overrides

    return stage_launch_config(KubernetesLaunchConfig.from_env(), stage, user_overrides(params.overrides()))


def make_launcher(params: TrainingParameters, workdir: Path, stage: str):
    """A local subprocess, or (launcher=kubernetes) an indexed Job shaped by kubernetes_launch_config()."""
    if params.launcher == "kubernetes":
        from pipeline.launch import k8s_api, kubernetes

        return kubernetes.KubernetesLauncher(kubernetes_launch_config(params, stage), k8s_api.default_api_client(),
                                             owner=k8s_api.owner_from_env())
    return LocalLauncher(workdir)


@task(task_run_name="run_stage:{stage}", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_infra_only)
def run_stage(ws: wsmod.Workspace, stage: str, params: TrainingParameters, run_id: str, dvc_tracked: bool,
              cached: stage_cache.StagePlan | None = None, pod_params: str | None = None) -> str | State:
    """Restore from a cache if possible, else launch the stage, then record it.

    Returns the outcome ("ran", ...); a stage restored from a cache ends in a Completed state named
    "Restored" (up-to-date outputs: "Cached") whose result is still the outcome string. While the stage
    runs, its progress lines feed live progress artifacts (flows/progress.py).

    Local artifacts: DVC's run-cache. Artifacts under a remote `paths.root` (s3://) are not in the
    workspace and DVC 3 cannot cache them: `cached` (flows/stage_cache.py, same inputs as DVC's key)
    says where this stage's outputs live for its key, and a complete one there is not re-run.
    """
    logger = get_run_logger()
    if cached is not None and not params.force and cached.complete():
        logger.info("%s: restored from the stage cache (key %s), not re-run: %s", stage, cached.key,
                    ", ".join(cached.outputs.values()))
        return _restored(stage, "restored", f"restored from the stage cache (key {cached.key})")
    if dvc_tracked and not params.force:
        state = wsmod.restore_stage(ws, stage)
        if state != "miss":
            how = "restored from the run-cache" if state == "run-cache" else state
            logger.info("%s: %s, not re-run", stage, how)
            return _restored(stage, state, how)
    launcher = make_launcher(params, ws.root, stage)
    # Local stages run in the workspace and read its params.yaml; pods read the run's params file on storage
    # (written once by the flow, with the version pins: see pin_data). The Kubernetes launcher adds the
    # pod's shape (trainer.num_nodes, devices, accelerator) as --set: the one setting that depends on it.
    args = ["--params", pod_params] if pod_params else []
    started = time.perf_counter()
    progress = StageProgress(stage, logger.info, parts=_progress_parts(ws, stage))
    code = None
    try:
        with _STAGE_SLOTS:  # independent stages run together, up to parallel_stages() at once
            code = launcher.run(StageCommand(stage=stage, args=args, run_id=run_id), log=progress.log)
    finally:
        progress.close(completed=code == 0)
    if code == EXIT_USER_ERROR:
        raise StageInputError(f"{stage} exited 2 (bad configuration or data): see the lines above")
    if code != 0:
        hint = " (SIGTERM: checkpointed, the retry resumes)" if code == EXIT_SIGTERM else ""
        raise StageInfraError(f"{stage} exited {code}{hint}")
    if dvc_tracked:
        wsmod.commit_stage(ws, stage)
    logger.info("%s: ran in %.1f s", stage, time.perf_counter() - started)
    restarts = getattr(launcher, "restarts", [])  # Kubernetes: the group was restarted after a lost rank
    if restarts:
        logger.warning("%s: %d restart(s): %s", stage, len(restarts), "; ".join(restarts))
        return f"ran after {len(restarts)} restart(s): " + "; ".join(restarts)
    return "ran"


def _restored(stage: str, outcome: str, how: str) -> State:
    """Not launched: a Completed state the UI shows as "Restored" (or "Cached"); `.result()` is `outcome`."""
    return Completed(name="Cached" if outcome == "up-to-date" else "Restored", message=f"{stage}: {how}",
                     data=outcome)


def _progress_parts(ws: wsmod.Workspace, stage: str) -> list[str]:
    """The fits a stage prints progress for, in order: finetune trains `finetuned`, then (by default) `scratch`."""
    if stage != "finetune":
        return [stage]
    try:
        scratch = load_config(ws.params_file).finetune.train_scratch_baseline
    except Exception:  # noqa: BLE001 - only the progress bar's split depends on it
        scratch = True
    return ["finetune:finetuned", "finetune:scratch"] if scratch else ["finetune:finetuned"]
