"""Kubernetes + S3: what a second flow run with unchanged inputs costs (goal: no stage Job at all).

    python -m bench.k8s_cache [--set key=value ...]

Runs the `train` flow three times with launcher=kubernetes against the tests' API stand-in (pods run
in the image `make image` built, each in its own network namespace; docs/kubernetes.md; as root) and artifacts on a local moto S3: (1) cold, (2) only
`finetune.epochs` changed, (3) the same inputs as (2). Prints, per run, the stage Jobs launched,
each stage's outcome and the flow's wall time, and the ratio of (3) to (1). Tiny params by default
(the tests' TINY), so the numbers measure the orchestration, not training.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from pipeline.localserver import free_port, start_moto

REPO = Path(__file__).resolve().parent.parent
BUCKET = "bench-k8s-cache"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-k8s-cache-"))
    port = free_port()
    credentials = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(credentials, PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      PREFECT_LOGGING_LEVEL="WARNING",
                      PIPELINE_K8S_CONFIG=json.dumps({"namespace": "ml-pipeline", "log_dir": str(tmp / "pod-logs"),
                                                      "poll_seconds": 0.5}))
    moto = start_moto(port, tmp / "moto.log")
    from kubernetes import client as k8s
    from prefect.testing.utilities import prefect_test_harness

    from pipeline.launch import k8s_api
    from flows.parameters import TrainingParameters
    from flows.training import train
    from pipeline.params import update_params_file
    from tests.conftest import TINY
    from tests.k8s_standin import StandIn
    from tests.prefect_fixtures import copy_project

    import s3fs
    s3fs.S3FileSystem().mkdir(BUCKET)
    project = copy_project(tmp / "project")
    update_params_file(project / "params.yaml", [f"paths.runs={tmp / 'runs'}"])
    os.environ["PIPELINE_PROJECT"] = str(project)
    standin = StandIn(tmp / "standin")
    k8s_api.default_api_client = standin.api_client
    pods_see = {**credentials, "AWS_ENDPOINT_URL": standin.node_url(port)}  # moto as pods reach it
    k8s.CoreV1Api(standin.api_client()).create_namespaced_secret("ml-pipeline", k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="s3-credentials"), string_data=pods_see))
    base = [*TINY, f"paths.root=s3://{BUCKET}/art", f"paths.registry=s3://{BUCKET}/registry", *args.overrides]
    try:
        with prefect_test_harness(server_startup_timeout=120):
            walls = []
            for label, extra in (("cold", []), ("finetune.epochs changed", ["finetune.epochs=3"]),
                                 ("unchanged", ["finetune.epochs=3"])):
                before = {j["metadata"]["name"] for j in standin.jobs()}
                started = time.perf_counter()
                result = train(TrainingParameters(launcher="kubernetes", extra_overrides=[*base, *extra]))
                walls.append(time.perf_counter() - started)
                launched = sorted(j["metadata"]["labels"]["pipeline.example/stage"] for j in standin.jobs()
                                  if j["metadata"]["name"] not in before)
                print(f"{label:>24}: {walls[-1]:6.1f} s, stage Jobs launched {launched or 'none'}, "
                      f"stages {result['stages']}", flush=True)
            print(f"unchanged / cold wall time: {walls[2] / walls[0]:.3f}")
    finally:
        standin.close()
        moto.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
