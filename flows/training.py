"""The flows: `train` (version data -> dvc.yaml's stages -> promotion gate) and `retrain` (cron: only when
the data or the corpus changed).

Orchestration only: each stage is `python -m pipeline <stage>` run by a launcher (flows/stage_task.py: a
local subprocess, or an indexed Job on Kubernetes), skipped when DVC's run-cache already holds its outputs
for the same code, data and params. Stages whose inputs are ready run together. Versioning and pins:
flows/versioning.py; artifacts: flows/artifacts.py; Kubernetes guards and cleanup: flows/kubernetes_runs.py.

    make run                      # this flow on an ephemeral Prefect server, local processes
    pipeline run --set finetune.labels_per_class=all
    make ui                       # server + UI; `train` (manual) and `retrain` (cron) deployments
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.futures import as_completed, wait

from flows import stage_cache
from flows import workspace as wsmod
from flows.artifacts import artifact_uri, link_latest, publish_artifacts, publish_curves
from flows.dag import stage_order, upstream_stages
from flows.kubernetes_runs import check_kubernetes_storage, delete_jobs_hook, prepare_namespace
from flows.parameters import TrainingParameters
from flows.promotion import LAST_EVALUATED, champion_pointer, decide
from flows.stage_task import StageInputError, kubernetes_launch_config, run_stage
from flows.versioning import pin_data, version_data
from pipeline import storage
from pipeline.config import Config
from pipeline.params import apply_overrides, build_config, read_params, write_params
from pipeline.errors import EXIT_USER_ERROR, ConfigError, UserInputError
from pipeline.launch.shape import TRAINING_STAGES


def project_root() -> Path:
    """The project the flow copies into each workspace: this checkout, or `PIPELINE_PROJECT`
    (the image's /app on Kubernetes, a private copy in tests). Where runs, the registry and the
    DVC remote live is configuration (`paths.runs`, `paths.registry`, `paths.dvc_remote`)."""
    return Path(os.environ.get("PIPELINE_PROJECT") or Path(__file__).resolve().parent.parent)


def effective_params(params: TrainingParameters, project: Path | None = None) -> dict:
    """params.yaml + the flow's overrides, as the YAML mapping (not yet validated)."""
    return apply_overrides(read_params((project or project_root()) / "params.yaml"), params.overrides())


def effective_config(params: TrainingParameters, project: Path | None = None) -> Config:
    """params.yaml + the flow's overrides, validated (exit-2 errors before any work)."""
    return build_config(effective_params(params, project))


@task
def promote(ws: wsmod.Workspace, cfg: Config, run_name: str, stages: dict[str, str]) -> dict:
    decision = decide(cfg, {name: artifact_uri(ws, cfg, name) for name in ("reports", "prepared", "release")},
                      cfg.paths.project_uri("registry", ws.project), run_name, stages)
    get_run_logger().info("promotion: %s (%s)", "PROMOTED" if decision["promoted"] else "kept champion",
                          decision["reason"])
    return decision


def _run_name() -> tuple[str, str]:
    ctx = get_run_context()
    run = ctx.flow_run
    return str(run.id), f"{time.strftime('%Y%m%d-%H%M%S')}-{run.name}"


@flow(name="train", log_prints=True, on_cancellation=[delete_jobs_hook], on_crashed=[delete_jobs_hook])
def train(params: TrainingParameters = TrainingParameters()) -> dict:
    """Version the data, run prepare -> pretrain -> finetune -> evaluate, then the promotion gate."""
    logger = get_run_logger()
    run_id, run_name = _run_name()
    project = project_root()
    raw = effective_params(params, project)  # params.yaml + the form: the run's config, built once from here
    cfg = build_config(raw)  # exit-2 errors before any work
    if params.launcher == "kubernetes":
        check_kubernetes_storage(cfg, project)  # before any Job: a GPU hour must not end in "no credentials"
        for stage in TRAINING_STAGES:  # nor a stage shape that contradicts the overlay (exit 2)
            kubernetes_launch_config(params, stage)
    prepare_namespace(params, run_id)  # a rescheduled attempt's old Jobs stopped; orphans of dead runs gone
    ws = wsmod.create_workspace(project, _runs_dir(cfg, project) / run_name,
                                dvc_remote=cfg.paths.project_uri("dvc_remote", project))
    data = version_data(ws, cfg)
    # Stages read the DVC snapshots (pods: the original sources), and the versions pin prepare's and corpus's
    # cache keys to the content.
    local_pins, pod_pins = pin_data(params, data)
    cfg = build_config(apply_overrides(raw, local_pins))
    tracked = cfg.paths.root in ("", ".")
    order, plans = stage_order(ws.root / "dvc.yaml"), {}
    if not tracked:
        # Remote artifacts: every output goes under its stage key, in the workspace and for the pods alike.
        plans = stage_cache.plan(ws.root, cfg, order)
        cache_pins = [item for plan in plans.values() for item in plan.overrides()]
        local_pins, pod_pins = [*local_pins, *cache_pins], [*pod_pins, *cache_pins]
        cfg = build_config(apply_overrides(raw, local_pins))
    # The run's config is written once: local stages read the workspace's params.yaml; pods (which cannot see
    # the workspace) read the same settings, with the original source URIs, from one file on storage.
    write_params(ws.params_file, apply_overrides(raw, local_pins))
    if tracked:
        wsmod.pull_run_cache(ws)
    pod_params = (_write_pod_params(apply_overrides(raw, pod_pins), cfg, run_name)
                  if params.launcher == "kubernetes" else None)
    outcomes = _run_stages(order, upstream_stages(ws.root / "dvc.yaml"),
                           lambda stage, after: run_stage.submit(ws, stage, params, run_id, tracked, plans.get(stage),
                                                                 pod_params, wait_for=after))
    # Artifacts on s3:// are not DVC outputs, but the source snapshot still goes to the remote.
    snapshots = [s for s in (data["snapshot"], data["corpus"]["snapshot"]) if s]
    pushed = wsmod.push(ws) if tracked else bool(snapshots) and wsmod.push(ws, snapshots)
    metrics = storage.read_json(storage.join(artifact_uri(ws, cfg, "reports"), "metrics.json"))
    decision = promote(ws, cfg, run_name, outcomes)
    publish_artifacts(metrics, decision, ws, cfg, data)
    publish_curves(artifact_uri(ws, cfg, "release"))
    link_latest(ws.root)
    logger.info("stages: %s; pushed to remote: %s", outcomes, pushed)
    return {"run": run_name, "workspace": str(ws.root), "data": data, "stages": outcomes,
            "metrics": metrics, "promotion": decision}


def _write_pod_params(raw: dict, cfg: Config, run_name: str) -> str:
    """The stage pods' params.yaml: the run's config with the pods' pins, on storage every pod reaches
    (`<paths.root>/runs/<run>/params.yaml`) -> its URI, which each pod gets as `--params`."""
    build_config(raw)  # validated as the pods will read it
    uri = storage.join(cfg.paths.root, "runs", run_name, "params.yaml")
    write_params(uri, raw)
    return uri


def _run_stages(order: list[str], upstream: dict[str, list[str]], submit) -> dict[str, str]:
    """Run the stages as their inputs become ready -> {stage: outcome}.

    A stage is submitted once its dvc.yaml upstreams have succeeded, so independent ones (prepare and corpus)
    run together, up to parallel_stages() at once (on Kubernetes one Job each). Its upstreams' futures go in as
    wait_for: Prefect records them as the task run's inputs, and the UI's run graph draws the chain with
    prepare and corpus side by side. Once a stage fails nothing new starts: the stages still running end,
    then the failure is raised (exit 2 stays exit 2)."""
    futures, running, outcomes, waiting = {}, {}, {}, list(order)
    while waiting or running:
        for stage in [s for s in waiting if all(up in outcomes for up in upstream.get(s, []))]:
            waiting.remove(stage)
            running[stage] = futures[stage] = submit(stage, [futures[up] for up in upstream.get(stage, [])])
        done = next(as_completed(list(running.values())))
        stage = next(name for name, future in running.items() if future is done)
        del running[stage]
        if not done.state.is_completed():
            wait(list(running.values()))
            done.result()  # raises the stage's error
        outcomes[stage] = done.result()
    return {stage: outcomes[stage] for stage in order}


@flow(name="retrain", log_prints=True)
def retrain(params: TrainingParameters = TrainingParameters()) -> dict:
    """Scheduled: retrain only if the target data or the pretraining corpus changed since the last
    evaluated run, or if forced."""
    from pipeline.data.sources import content_id

    project = project_root()
    cfg = effective_config(params, project)
    registry = cfg.paths.project_uri("registry", project)
    # Compare with the newest *evaluated* run, not only the champion: a challenger that lost on this
    # data must not be retrained every week until the data changes.
    last = champion_pointer(registry, LAST_EVALUATED) or champion_pointer(registry)
    version = content_id(cfg.data.source, "data", cfg)
    corpus = content_id(cfg.pretrain.source, "corpus", cfg)
    unchanged = last and last.get("data_version") == version and last.get("corpus_version", corpus) == corpus
    if unchanged and not params.force:
        message = (f"no change: data {version} and corpus {corpus} were already evaluated in run {last['run']}; "
                   "nothing to do")
        get_run_logger().info(message)
        create_markdown_artifact(key="retrain", markdown=f"**No retraining.** {message}")
        return {"retrained": False, "data_version": version, "corpus_version": corpus}
    return {"retrained": True, "data_version": version, "corpus_version": corpus, **train(params)}


def _runs_dir(cfg: Config, project: Path) -> Path:
    runs = cfg.paths.project_uri("runs", project)
    if storage.is_remote(runs):
        raise ConfigError(f"paths.runs: {runs!r} must be a local folder (each run's DVC workspace lives there)")
    return Path(runs)


def run_pipeline_cli(params_file: str, overrides: list[str], force: bool = False) -> int:
    """`pipeline run`: the train flow on the embedded (ephemeral) Prefect server, then a summary table."""
    from flows.summary import print_summary

    if Path(params_file).resolve() != (project_root() / "params.yaml").resolve():
        raise ConfigError(f"--params {params_file}: `pipeline run` uses the project's params.yaml; "
                          "pass changes with --set")
    state = train(TrainingParameters(extra_overrides=overrides, force=force), return_state=True)
    if state.is_completed():
        print_summary(state.result())
        return 0
    try:
        state.result()
    except UserInputError as exc:
        print(f"error: {exc.render()}")
        return EXIT_USER_ERROR
    except StageInputError as exc:
        print(f"error: {exc}")
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - reported, and the exit code says infra fault
        print(f"error: flow failed: {exc}")
    return 1
