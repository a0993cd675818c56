"""`pipeline <stage>` / `python -m pipeline <stage>`: the one entry point every launcher calls.

dvc.yaml's `cmd`, the Prefect local launcher and the Kubernetes pods all run this, so a
stage behaves the same everywhere. Exit codes: 0 ok, 2 bad configuration or data (every
problem listed), 143 stopped by SIGTERM (resumable), anything else a bug or infra fault.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from pipeline.config import DEFAULT_PARAMS
from pipeline.params import load_config
from pipeline.errors import EXIT_SIGTERM, EXIT_USER_ERROR, ConfigError, PreflightError, Terminated, UserInputError
from pipeline.stages import STAGES, stage_runner

LAUNCH_BASE = "k8s/base/launch-base.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_args = argparse.ArgumentParser(add_help=False)
    config_args.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    config_args.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                             help="override one param, e.g. --set finetune.labels_per_class=all (repeatable)")
    for stage in STAGES:
        commands.add_parser(stage, parents=[config_args], help=f"run the {stage} stage")
    commands.add_parser("show-config", parents=[config_args], help="print the effective, validated config")
    run = commands.add_parser("run", parents=[config_args], help="run the whole pipeline as a Prefect flow")
    run.add_argument("--force", action="store_true", help="re-run every stage even if cached")
    predict = commands.add_parser(
        "predict", parents=[config_args], help="classify images with the champion (or any release)",
        description="Print `path<TAB>class<TAB>confidence` per image (pipeline/predict.py). --params (default: "
                    "params.yaml if present) and --set are read for paths.registry and evaluate.batch_size only.")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders (recursive)")
    predict.add_argument("--model", default="champion", metavar="champion|RUN|URI",
                         help="`champion` (default): <registry>/champion.json; RUN: <registry>/releases/RUN; "
                              "URI: a release folder or a .safetensors model file, local or s3://")
    predict.add_argument("--out", metavar="FILE.csv|FILE.json", help="also write the predictions to this file")
    predict.add_argument("--batch-size", type=int, help="images per forward pass (default: evaluate.batch_size)")
    score = commands.add_parser(
        "score", help="a released model's test accuracy on a prepared dataset, as one JSON line",
        description="Print {classes, data_classes, accuracy} as JSON: the promotion gate re-scores the champion "
                    "with it on the run's test set (accuracy null when the classes differ).")
    score.add_argument("--model", required=True, metavar="URI", help="a .safetensors classifier, local or s3://")
    score.add_argument("--prepared", required=True, metavar="URI", help="a prepared dataset (its test split is scored)")
    score.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    k8s = commands.add_parser("k8s", help="Kubernetes helpers (no cluster needed)")
    k8s_commands = k8s.add_subparsers(dest="k8s_command", required=True, metavar="COMMAND")
    render = k8s_commands.add_parser(
        "render", parents=[config_args], help="print a stage's Job and Service as the flow would submit them",
        description="Print, as YAML (Job, then Service), the objects the Kubernetes launcher submits for STAGE "
                    "with these --set overrides: same shape rules, same renderer, same args. No cluster.")
    render.add_argument("stage", choices=STAGES, metavar="STAGE", help=f"one of {', '.join(STAGES)}")
    render.add_argument("--overlay", type=Path, help="k8s/overlays/<name>: its launch.json over the base "
                                                     "(default: the base alone)")
    render.add_argument("--base", type=Path, default=Path(LAUNCH_BASE), help=f"base launch settings (default: {LAUNCH_BASE})")
    render.add_argument("--run-id", default="render", help="flow run id for names and labels (default: render)")
    return parser


def _read_launch_file(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _k8s_render(args: argparse.Namespace) -> int:
    """`pipeline k8s render`: read the launch files as flows/deploy.py does, shape and render as the flow does."""
    import yaml

    from pipeline.launch.k8s_settings import KubernetesLaunchConfig
    from pipeline.launch.k8s_api import owner_from_env
    from pipeline.launch.shape import render_stage

    files = [args.base, *([args.overlay / "launch.json"] if args.overlay else [])]
    base = KubernetesLaunchConfig.from_layers([(str(path), _read_launch_file(path)) for path in files])
    objects = render_stage(base, args.stage, args.overrides, args.run_id, owner_from_env())
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    return 0


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def _injected_fault(stage: str) -> bool:
    """PIPELINE_INJECT_FAULT=<stage>:<marker>: fail once like a crashed node (exit 1), for retry tests.

    The marker file records that the fault fired, so the retry then succeeds.
    """
    spec = os.environ.get("PIPELINE_INJECT_FAULT", "")
    target, _, marker = spec.partition(":")
    if target != stage or not marker or os.path.exists(marker):
        return False
    with open(marker, "w") as handle:
        handle.write("fired\n")
    print(f"[{stage}] injected infrastructure fault (PIPELINE_INJECT_FAULT)", file=sys.stderr, flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "predict":
            from pipeline.predict import run as predict  # lazy: stages never import it (dvc.yaml deps)

            return predict(args)
        if args.command == "score":
            import json

            from pipeline.stages.evaluate import score_model

            print(json.dumps(score_model(args.model, args.prepared, args.batch_size)), flush=True)
            return 0
        cfg = load_config(args.params, args.overrides)
        if args.command == "show-config":
            import yaml

            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            return 0
        if args.command == "run":
            # The embedded server's first start (SQLite migrations) can exceed Prefect's default on a busy laptop.
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
            from flows.training import run_pipeline_cli

            return run_pipeline_cli(args.params, args.overrides, force=args.force)
        if args.command == "k8s":
            return _k8s_render(args)
        if _injected_fault(args.command):
            return 1
        stage_runner(args.command)(cfg)
        return 0
    except UserInputError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)  # infra fault (exit 1): the job's shape is wrong, not the params
        return 1
    except Terminated:
        print("terminated by SIGTERM: progress is checkpointed; re-run to resume", file=sys.stderr)
        return EXIT_SIGTERM


if __name__ == "__main__":
    sys.exit(main())
