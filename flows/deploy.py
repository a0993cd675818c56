"""Register `train` and `retrain` on a Kubernetes work pool (production), after checking the
cluster files with the same code that will read them: prefect-kubernetes's job configuration
for the pool's base job template, `KubernetesLaunchConfig` for the overlay's launch settings.

    PREFECT_API_URL=https://prefect.example/api python -m flows.deploy \
        --image registry.example/pipeline@sha256:... --pool training \
        --storage s3://ml-bucket/pipeline --overlay k8s/overlays/gpu
    python -m flows.deploy --check --image ... --storage ... --overlay ...   # only the checks

Anything the worker or the API would reject exits 2 here, naming the file and field, instead of
failing on the cluster. `--storage` is the one place the flows' storage is configured: stage
artifacts (`paths.root`), the registry (`paths.registry`: champion and last-evaluated pointers,
releases) and the DVC remote (`paths.dvc_remote`) all go under it, as deployment parameters
that the Prefect UI shows and a run may override. The image holds the code, so nothing is
built or pushed here; flow-run pods get `PIPELINE_LAUNCHER=kubernetes` from the template.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.errors import EXIT_USER_ERROR, ConfigError

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "k8s" / "base" / "base-job-template.json"
LAUNCH_BASE = ROOT / "k8s" / "base" / "launch-base.json"


def storage_overrides(storage: str) -> list[str]:
    base = storage.rstrip("/")
    return [f"paths.root={base}/artifacts", f"paths.registry={base}/registry", f"paths.dvc_remote={base}/dvc"]


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: {exc}")
        return None


def _pydantic_lines(path: Path, exc: ValidationError) -> list[str]:
    return [f"{path}: {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()]


def check_base_job_template(path: Path, image: str, problems: list[str]) -> dict | None:
    """Render the template exactly as the worker will (prefect-kubernetes's own code)."""
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = _read_json(path, problems)
    if template is None:
        return None
    try:
        run_coro_as_sync(KubernetesWorkerJobConfiguration.from_template_and_values(template, {"image": image}))
    except ValidationError as exc:
        problems.extend(_pydantic_lines(path, exc))
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(f"{path}: job_configuration: {exc}")
    return template


def check_launch_settings(overlay: Path | None, image: str, problems: list[str]) -> None:
    """The stage-launch settings the flow-run pod will read from ConfigMap training-launch."""
    from pipeline.launch.k8s_manifests import KubernetesLaunchConfig

    layers = []
    for path in [LAUNCH_BASE, *([overlay / "launch.json"] if overlay else [])]:
        values = _read_json(path, problems)
        if values is not None:
            layers.append((str(path), values))
    try:  # merged as the flow-run pod merges them, each problem naming the file that set the key
        KubernetesLaunchConfig.from_layers(layers)
    except ConfigError as exc:
        problems.extend(exc.problems)
    try:
        KubernetesLaunchConfig(image=image)
    except ValidationError as exc:
        problems.extend(f"--image: {e['msg']}" for e in exc.errors())


def check(image: str, storage: str, overlay: Path | None, template_path: Path = TEMPLATE) -> dict:
    """All problems at once (exit 2), else the parsed base job template."""
    from pipeline import storage as storage_mod

    problems: list[str] = []
    if not storage_mod.is_remote(storage):
        problems.append(f"--storage: {storage!r} must be a URI every pod reaches (s3://bucket/prefix)")
    template = check_base_job_template(template_path, image, problems)
    check_launch_settings(overlay, image, problems)
    if problems:
        raise ConfigError(problems)
    return template


def upsert_work_pool(name: str, template: dict) -> None:
    """Create the Kubernetes work pool with this template, or update its template."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="kubernetes", base_job_template=template))
        except ObjectAlreadyExists:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))


def deploy(image: str, pool: str, storage: str, cron: str, extra_overrides: list[str] = ()) -> None:
    from prefect.deployments.runner import EntrypointType

    from flows.training import retrain, train

    defaults = {"params": {"launcher": "kubernetes",
                           "extra_overrides": [*storage_overrides(storage), *extra_overrides]}}
    # Module entrypoint: the flow-run pod imports flows.training from the image, whatever its cwd.
    common = dict(work_pool_name=pool, image=image, build=False, push=False, parameters=defaults,
                  entrypoint_type=EntrypointType.MODULE_PATH, print_next_steps=False)
    train.deploy(name="train", **common)
    retrain.deploy(name="retrain", cron=cron, **common)


def main(argv: list[str] | None = None) -> int:
    from flows.serve import RETRAIN_CRON

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="pinned image, e.g. registry/pipeline@sha256:...")
    parser.add_argument("--pool", default="training", help="Kubernetes work pool name (created if missing)")
    parser.add_argument("--storage", required=True, help="s3://bucket/prefix for artifacts, registry and DVC remote")
    parser.add_argument("--overlay", type=Path, help="k8s/overlays/<name>: its launch.json is checked too")
    parser.add_argument("--base-job-template", type=Path, default=TEMPLATE)
    parser.add_argument("--cron", default=RETRAIN_CRON, help="retrain schedule")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="more default params for both deployments")
    parser.add_argument("--check", action="store_true", help="only check the files; register nothing")
    args = parser.parse_args(argv)
    try:
        template = check(args.image, args.storage, args.overlay, args.base_job_template)
    except ConfigError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"ok: {args.base_job_template} renders under prefect-kubernetes; launch settings valid")
    if not args.check:
        upsert_work_pool(args.pool, template)
        deploy(args.image, args.pool, args.storage, args.cron, args.overrides)
        print(f"deployed train and retrain ({args.cron}) to work pool {args.pool!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
