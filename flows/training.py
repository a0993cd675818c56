"""The training flow: version data -> dvc.yaml's stages in order -> promotion gate.

Orchestration only: each stage is `python -m pipeline <stage>` run by a launcher (a local
subprocess, or an indexed Job on Kubernetes), skipped when DVC's run-cache already holds
its outputs for the same code, data and params.

    make run                      # this flow on an ephemeral Prefect server, local processes
    pipeline run --set finetune.labels_per_class=all
    make ui                       # server + UI; `train` (manual) and `retrain` (cron) deployments
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.states import Completed, State

from flows import stage_cache
from flows import workspace as wsmod
from flows.dag import stage_order, upstream_stages
from flows.kubernetes_runs import delete_jobs_hook, prepare_namespace
from flows.parameters import TrainingParameters
from flows.progress import StageProgress
from flows.promotion import LAST_EVALUATED, champion_pointer, decide
from pipeline import storage
from pipeline.config import Config, apply_overrides, build_config, load_config, read_params, update_params_file
from pipeline.errors import EXIT_SIGTERM, EXIT_USER_ERROR, ConfigError, UserInputError
from pipeline.launch import StageCommand
from pipeline.launch.kubernetes import KubernetesLaunchError
from pipeline.launch.local import LocalLauncher
from pipeline.launch.shape import TRAINING_STAGES, set_args


def project_root() -> Path:
    """The project the flow copies into each workspace: this checkout, or `PIPELINE_PROJECT`
    (the image's /app on Kubernetes, a private copy in tests). Where runs, the registry and the
    DVC remote live is configuration (`paths.runs`, `paths.registry`, `paths.dvc_remote`)."""
    return Path(os.environ.get("PIPELINE_PROJECT") or Path(__file__).resolve().parent.parent)


def effective_config(params: TrainingParameters, project: Path | None = None) -> Config:
    """params.yaml + the flow's overrides, validated (exit-2 errors before any work)."""
    return build_config(apply_overrides(read_params((project or project_root()) / "params.yaml"), params.overrides()))


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
    from pipeline.launch.k8s_manifests import KubernetesLaunchConfig
    from pipeline.launch.shape import stage_launch_config, user_overrides

    return stage_launch_config(KubernetesLaunchConfig.from_env(), stage, user_overrides(params.overrides()))


def make_launcher(params: TrainingParameters, workdir: Path, stage: str):
    """A local subprocess, or (launcher=kubernetes) an indexed Job shaped by kubernetes_launch_config()."""
    if params.launcher == "kubernetes":
        from pipeline.launch import kubernetes

        return kubernetes.KubernetesLauncher(kubernetes_launch_config(params, stage), kubernetes.default_api_client(),
                                             owner=kubernetes.owner_from_env())
    return LocalLauncher(workdir)


@task(task_run_name="run_stage:{stage}", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_infra_only)
def run_stage(ws: wsmod.Workspace, stage: str, params: TrainingParameters, run_id: str, dvc_tracked: bool,
              cached: stage_cache.StagePlan | None = None) -> str | State:
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
    # Pods run the image's params.yaml, not this workspace's: ship the flow's overrides with the command
    # (for a pinned data source they include data.version: see _pin_data).
    args = set_args(params.overrides()) if params.launcher == "kubernetes" else []
    started = time.perf_counter()
    progress = StageProgress(stage, logger.info, parts=_progress_parts(ws, stage))
    code = None
    try:
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


def _version_one(ws: wsmod.Workspace, cfg: Config, source: str, kind: str, snapshot_path: str) -> dict:
    from pipeline.data.sources import content_id

    version = content_id(source, kind, cfg)
    snapshot = None
    if not source.startswith("builtin:"):
        fs, path = storage.filesystem(source)
        fs.get(path.rstrip("/") + "/", str(ws.root / snapshot_path), recursive=True)
        with wsmod.dvc_repo(ws) as repo:
            repo.add(snapshot_path)
        snapshot = f"{snapshot_path}.dvc"
    return {"version": version, "source": source, "snapshot": snapshot}


@task
def version_data(ws: wsmod.Workspace, cfg: Config) -> dict:
    """Content ids of the target data and of the pretraining corpus; folder sources are also snapshotted
    into DVC (and pushed with the run), so every run names exactly which images it learned from."""
    target = _version_one(ws, cfg, cfg.data.source, "data", "data/source")
    corpus = _version_one(ws, cfg, cfg.pretrain.source, "corpus", "data/corpus_source")
    get_run_logger().info("data version %s (%s); corpus version %s (%s)", target["version"], target["source"],
                          corpus["version"], corpus["source"])
    return {"data_version": target["version"], "source": target["source"], "snapshot": target["snapshot"],
            "corpus": corpus}


@task
def promote(ws: wsmod.Workspace, cfg: Config, run_name: str, stages: dict[str, str]) -> dict:
    decision = decide(cfg, {name: artifact_uri(ws, cfg, name) for name in ("reports", "prepared", "release")},
                      cfg.paths.project_uri("registry", ws.project), run_name, stages)
    get_run_logger().info("promotion: %s (%s)", "PROMOTED" if decision["promoted"] else "kept champion",
                          decision["reason"])
    return decision


def _publish_artifacts(metrics: dict, decision: dict, ws: wsmod.Workspace, cfg: Config, data: dict) -> None:
    scratch = metrics.get("scratch", {}).get("test", {}).get("accuracy")
    create_table_artifact(key="metrics", description="Test-set metrics", table=[
        {"model": "fine-tuned", "test accuracy": metrics["test"]["accuracy"], "test loss": metrics["test"]["loss"]},
        {"model": "scratch (same budget)", "test accuracy": scratch, "test loss": None},
    ])
    champion = decision["champion_accuracy"]
    create_markdown_artifact(key="promotion", description="Promotion decision", markdown="\n".join([
        "| | |", "|---|---|",
        f"| data version | `{data['data_version']}` ({data['source']}) |",
        f"| pretraining corpus | `{data['corpus']['version']}` ({data['corpus']['source']}) |",
        f"| labels per class | {cfg.finetune.labels_per_class} |",
        f"| fine-tuned test accuracy | {metrics['test']['accuracy']:.4f} |",
        f"| scratch test accuracy | {scratch if scratch is None else f'{scratch:.4f}'} |",
        f"| **transfer gain** | **{metrics.get('transfer_gain', float('nan')):+.4f}** |",
        f"| champion accuracy (same test set) | {'n/a' if champion is None else f'{champion:.4f}'} |",
        f"| decision | **{'promoted' if decision['promoted'] else 'not promoted'}**: {decision['reason']} |",
        f"| model + card | `{decision['release']}` |",
        f"| workspace | `{ws.root}` |",
    ]))


def _publish_curves(release: str, points_per_series: int = 6) -> None:
    """The release's `curves.json` ({series: [[step, value], ...]}) as a "curves" markdown artifact: a few
    evenly spaced points per series, first and last included. No file (yet): nothing."""
    from flows.summary import curves_markdown

    uri = storage.join(release, "curves.json")
    try:
        if not storage.exists(uri):
            return
        markdown = curves_markdown(storage.read_json(uri), points_per_series, release=release)
    except Exception as exc:  # noqa: BLE001 - a view of the curves never fails a finished run
        get_run_logger().warning("curves artifact skipped: %s: %s", type(exc).__name__, exc)
        return
    create_markdown_artifact(key="curves", description="Training curves (the release's curves.png, and curves.json thinned)",
                             markdown=markdown)


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
    cfg = effective_config(params, project)
    if params.launcher == "kubernetes":
        _check_kubernetes_storage(cfg, project)  # before any Job: a GPU hour must not end in "no credentials"
        for stage in TRAINING_STAGES:  # nor a stage shape that contradicts the overlay (exit 2)
            kubernetes_launch_config(params, stage)
    prepare_namespace(params, run_id)  # a rescheduled attempt's old Jobs stopped; orphans of dead runs gone
    ws = wsmod.create_workspace(project, _runs_dir(cfg, project) / run_name, params.overrides(),
                                dvc_remote=cfg.paths.project_uri("dvc_remote", project))
    data = version_data(ws, cfg)
    # Stages read the DVC snapshots (pods: the original sources), and the versions pin prepare's and corpus's
    # cache keys to the content; on Kubernetes the returned params carry the pins to the pods.
    cfg, params = _pin_data(ws, params, data)
    tracked = cfg.paths.root in ("", ".")
    order, plans = stage_order(ws.root / "dvc.yaml"), {}
    if tracked:
        wsmod.pull_run_cache(ws)
    else:
        # Remote artifacts: every output goes under its stage key, in the workspace and for the pods alike.
        plans = stage_cache.plan(ws.root, cfg, order)
        pins = [item for plan in plans.values() for item in plan.overrides()]
        cfg = update_params_file(ws.params_file, pins)
        params = params.model_copy(update={"extra_overrides": [*params.extra_overrides, *pins]})
    # One stage at a time (they share the DVC workspace), each submitted with its dvc.yaml upstreams as
    # wait_for: Prefect records them as the task run's inputs, and the UI's run graph draws the chain.
    upstream, futures, outcomes = upstream_stages(ws.root / "dvc.yaml"), {}, {}
    for stage in order:
        futures[stage] = run_stage.submit(ws, stage, params, run_id, tracked, plans.get(stage),
                                          wait_for=[futures[up] for up in upstream.get(stage, []) if up in futures])
        outcomes[stage] = futures[stage].result()
    # Artifacts on s3:// are not DVC outputs, but the source snapshot still goes to the remote.
    snapshots = [s for s in (data["snapshot"], data["corpus"]["snapshot"]) if s]
    pushed = wsmod.push(ws) if tracked else bool(snapshots) and wsmod.push(ws, snapshots)
    metrics = storage.read_json(storage.join(artifact_uri(ws, cfg, "reports"), "metrics.json"))
    decision = promote(ws, cfg, run_name, outcomes)
    _publish_artifacts(metrics, decision, ws, cfg, data)
    _publish_curves(artifact_uri(ws, cfg, "release"))
    _link_latest(ws.root)
    logger.info("stages: %s; pushed to remote: %s", outcomes, pushed)
    return {"run": run_name, "workspace": str(ws.root), "data": data, "stages": outcomes,
            "metrics": metrics, "promotion": decision}


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


def artifact_uri(ws: wsmod.Workspace, cfg: Config, name: str) -> str:
    """Where a stage output lives: under the workspace by default, else under `paths.root`."""
    if cfg.paths.root in ("", ".") and "://" not in getattr(cfg.paths, name):
        return str(ws.root / getattr(cfg.paths, name))
    return cfg.paths.uri(name)


def _runs_dir(cfg: Config, project: Path) -> Path:
    runs = cfg.paths.project_uri("runs", project)
    if storage.is_remote(runs):
        raise ConfigError(f"paths.runs: {runs!r} must be a local folder (each run's DVC workspace lives there)")
    return Path(runs)


def _check_kubernetes_storage(cfg: Config, project: Path) -> None:
    """Flow-run pods keep nothing: artifacts and the registry must be on storage every pod reaches,
    with credentials that work (the S3 Secret, or IRSA). Exit 2 naming what is missing, before any Job."""
    registry = cfg.paths.project_uri("registry", project)
    problems = []
    if not storage.is_remote(cfg.paths.root):
        problems.append("paths.root: launcher=kubernetes needs artifacts on storage every pod can reach "
                        "(e.g. s3://bucket/prefix); pods cannot write into this workspace")
    if not storage.is_remote(registry):
        problems.append(f"paths.registry: {registry!r} is inside the flow-run pod, which is thrown away after the "
                        "run; set it to s3://bucket/prefix so the champion and last evaluation persist")
    if problems:
        raise ConfigError(problems)
    remote = cfg.paths.project_uri("dvc_remote", project)
    try:
        storage.check_buckets([cfg.paths.root, registry, *([remote] if storage.is_remote(remote) else [])])
    except UserInputError as exc:
        from pipeline.launch.k8s_manifests import KubernetesLaunchConfig

        secret = KubernetesLaunchConfig.from_env().env_from_secret
        hint = (f"the flow-run pod reads S3 credentials from Secret {secret!r} (docs/kubernetes.md, step 2)"
                if secret else "no Secret is configured (env_from_secret: null): IRSA/workload identity must apply")
        raise type(exc)([*exc.problems, hint]) from None


def _pin_data(ws: wsmod.Workspace, params: TrainingParameters, data: dict) -> tuple[Config, TrainingParameters]:
    """Pin both versioned datasets for the stages: (the workspace's config, the params stages get).

    Local stages read the workspace's params.yaml: a folder source becomes its DVC snapshot
    (`data.source=data/source`, `pretrain.source=data/corpus_source`) and each version is pinned
    (`data.version`, `pretrain.version`). Pods see only the image and the `--set` args run_stage ships
    from the params: they get the version pins too but keep the original URIs (the snapshot paths exist
    only in this workspace), so prepare and corpus refuse content that changed since version_data.
    """
    datasets = [("data", data)]
    if "corpus" in data:
        datasets.append(("pretrain", data["corpus"]))
    workspace, pods = [], list(params.extra_overrides)
    for section, info in datasets:
        if info["source"].startswith("builtin:"):
            continue  # generated by code the stage's key already covers: a pin would only split the run-cache
        version = info.get("data_version") or info.get("version")
        workspace.append(f"{section}.version={version}")
        pods.append(f"{section}.version={version}")
        if params.launcher == "kubernetes" and not storage.is_remote(info["source"]):
            raise ConfigError(f"{section}.source: {info['source']!r} is on the flow-run pod; stage pods cannot "
                              "read it (use s3://bucket/prefix or a builtin: source)")
        workspace.append(f"{section}.source={info['snapshot'].removesuffix('.dvc')}")
    # Builtin sources only: the workspace's params.yaml stays byte for byte what create_workspace wrote.
    cfg = update_params_file(ws.params_file, workspace) if workspace else load_config(ws.params_file)
    if params.launcher != "kubernetes":
        return cfg, params
    return cfg, params.model_copy(update={"extra_overrides": pods})


def _link_latest(run_root: Path) -> None:
    latest = run_root.parent / "latest"
    tmp = run_root.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_root.name)
    os.replace(tmp, latest)


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
