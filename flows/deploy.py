"""Register `train` and `retrain` on a Kubernetes work pool (production), after checking the
cluster files with the same code that will read them: prefect-kubernetes's job configuration
for the pool's base job template, `KubernetesLaunchConfig` for the overlay's launch settings.

    PREFECT_API_URL=https://prefect.example/api python -m flows.deploy \
        --image registry.example/pipeline@sha256:... --pool training \
        --storage s3://ml-bucket/pipeline --overlay k8s/overlays/gpu
    python -m flows.deploy --check --image ... --storage ... --overlay ...   # only the checks

Anything the worker, the API or the kubelet would reject exits 2 here, naming the file and field
(or flag), instead of failing on the cluster. `--storage` is the one place the flows' storage is configured: stage
artifacts (`paths.root`), the registry (`paths.registry`: champion and last-evaluated pointers,
releases) and the DVC remote (`paths.dvc_remote`) all go under it, as deployment parameters
that the Prefect UI shows and a run may override. The image holds the code, so nothing is
built or pushed here; flow-run pods get `PIPELINE_LAUNCHER=kubernetes` from the template, and
the image reference and the overlay's pull Secrets as the deployments' work-pool variables.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.errors import EXIT_USER_ERROR, ConfigError

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "k8s" / "base" / "base-job-template.json"
LAUNCH_BASE = ROOT / "k8s" / "base" / "launch-base.json"


# The grammar of github.com/distribution/reference (regexp.go; Parse, ParseNormalizedNamed), which the
# kubelet and containerd parse a container's `image` with. The API server only checks that `image` is
# not blank, so a reference outside it is stored, and every pod made from it waits in InvalidImageName.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
IMAGE_REFERENCE = re.compile(
    rf"(?:{_DOMAIN}/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    r"(?::(?P<tag>\w[\w.-]{0,127}))?"
    r"(?:@(?P<algorithm>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*):(?P<hex>[0-9a-fA-F]{32,}))?",
    re.ASCII)
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}  # go-digest's algorithms


def image_reference_problem(image: str) -> str | None:
    """Why the kubelet would refuse `image` (InvalidImageName), else None. A tag, a digest, or both
    (`name:tag@sha256:...`: the digest is what gets pulled) are all fine."""
    if re.fullmatch(r"[a-f0-9]{64}", image):
        return "a bare 64-hex image ID is not a reference"
    match = IMAGE_REFERENCE.fullmatch(image)
    if match is None:
        if IMAGE_REFERENCE.fullmatch(image.lower()):
            return "the repository name must be lower-case"
        return "not an image reference: [HOST[:PORT]/]PATH[:TAG][@sha256:HEX]"
    if len(match["path"]) > 255:
        return "the repository path is longer than 255 characters"
    if match["algorithm"]:
        want = _DIGEST_HEX_LENGTH.get(match["algorithm"])
        if want is None:
            return f"unsupported digest algorithm {match['algorithm']!r} (sha256, sha384 or sha512)"
        if len(match["hex"]) != want or not re.fullmatch(r"[a-f0-9]+", match["hex"]):
            return f"a {match['algorithm']} digest is {want} lower-case hex digits"
    return None


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


def job_variables(image: str, image_pull_secrets: list[str] = ()) -> dict[str, Any]:
    """The deployments' work-pool variables. The image goes here as given, not through Prefect's
    `deploy(image=...)`: that splits it into name and tag (prefect.utilities.dockerutils.parse_image_tag)
    and re-joins them as `name:tag` (prefect.docker.docker_image.DockerImage.reference), which turns
    `name@sha256:D` into the invalid `name:sha256:D` and refuses `name:tag@sha256:D` outright.
    The flow-run pod pulls the same image as the stage pods, so it gets their pull Secrets too."""
    values: dict[str, Any] = {"image": image}
    if image_pull_secrets:  # else the pool's own default (`[]`, or what an admin set there) applies
        values["image_pull_secrets"] = [{"name": name} for name in image_pull_secrets]
    return values


def check_base_job_template(path: Path, values: dict[str, Any], problems: list[str]) -> dict | None:
    """Render the template with the deployments' variables exactly as the worker will
    (prefect-kubernetes's own code)."""
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = _read_json(path, problems)
    if template is None:
        return None
    try:
        run_coro_as_sync(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    except ValidationError as exc:
        problems.extend(_pydantic_lines(path, exc))
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(f"{path}: job_configuration: {exc}")
    return template


def check_launch_settings(overlay: Path | None, image: str, problems: list[str]):
    """The stage-launch settings the flow-run pod will read from ConfigMap training-launch, merged
    (a KubernetesLaunchConfig), or None when they are invalid."""
    from pipeline.launch.k8s_settings import KubernetesLaunchConfig

    layers = []
    for path in [LAUNCH_BASE, *([overlay / "launch.json"] if overlay else [])]:
        values = _read_json(path, problems)
        if values is not None:
            layers.append((str(path), values))
    launch = None
    try:  # merged as the flow-run pod merges them, each problem naming the file that set the key
        launch = KubernetesLaunchConfig.from_layers(layers)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if launch is not None and (problem := image_reference_problem(launch.image)) is not None:
        # The stage pods' image: pinned is checked above, parseable only here.
        source = next((src for src, values in reversed(layers) if "image" in values), str(LAUNCH_BASE))
        problems.append(f"{source}: image: {launch.image!r}: {problem}")
    try:
        KubernetesLaunchConfig(image=image)
    except ValidationError as exc:
        problems.extend(f"--image: {e['msg']}" for e in exc.errors())
    return launch


def check(image: str, storage: str, overlay: Path | None,
          template_path: Path = TEMPLATE) -> tuple[dict, dict[str, Any]]:
    """All problems at once (exit 2), else the parsed base job template and the deployments' job variables."""
    from pipeline import storage as storage_mod

    problems: list[str] = []
    if not storage_mod.is_remote(storage):
        problems.append(f"--storage: {storage!r} must be a URI every pod reaches (s3://bucket/prefix)")
    if (problem := image_reference_problem(image)) is not None:
        problems.append(f"--image: {image!r}: {problem}")
    launch = check_launch_settings(overlay, image, problems)
    values = job_variables(image, launch.image_pull_secrets if launch else [])
    template = check_base_job_template(template_path, values, problems)
    if problems:
        raise ConfigError(problems)
    return template, values


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


def deploy(variables: dict[str, Any], pool: str, storage: str, cron: str, extra_overrides: list[str] = ()) -> None:
    from prefect.deployments.runner import EntrypointType

    from flows.training import retrain, train

    defaults = {"params": {"launcher": "kubernetes",
                           "extra_overrides": [*storage_overrides(storage), *extra_overrides]}}
    # Module entrypoint: the flow-run pod imports flows.training from the image, whatever its cwd (and
    # Prefect needs no `image=` argument, which would rewrite the reference: see job_variables).
    common = dict(work_pool_name=pool, job_variables=variables, build=False, push=False, parameters=defaults,
                  entrypoint_type=EntrypointType.MODULE_PATH, print_next_steps=False)
    train.deploy(name="train", **common)
    retrain.deploy(name="retrain", cron=cron, **common)


def main(argv: list[str] | None = None) -> int:
    from flows.serve import RETRAIN_CRON

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True,
                        help="pinned image, deployed as given: registry/pipeline@sha256:..., :TAG or :TAG@sha256:...")
    parser.add_argument("--pool", default="training", help="Kubernetes work pool name (created if missing)")
    parser.add_argument("--storage", required=True, help="s3://bucket/prefix for artifacts, registry and DVC remote")
    parser.add_argument("--overlay", type=Path, help="k8s/overlays/<name>: its launch.json is checked too, "
                        "and its image_pull_secrets go to the flow-run pods as well")
    parser.add_argument("--base-job-template", type=Path, default=TEMPLATE)
    parser.add_argument("--cron", default=RETRAIN_CRON, help="retrain schedule")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="more default params for both deployments")
    parser.add_argument("--check", action="store_true", help="only check the files; register nothing")
    args = parser.parse_args(argv)
    try:
        template, variables = check(args.image, args.storage, args.overlay, args.base_job_template)
    except ConfigError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"ok: {args.base_job_template} renders under prefect-kubernetes; launch settings valid")
    if not args.check:
        upsert_work_pool(args.pool, template)
        deploy(variables, args.pool, args.storage, args.cron, args.overrides)
        print(f"deployed train and retrain ({args.cron}) to work pool {args.pool!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
