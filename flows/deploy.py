"""Register the `train` and `retrain` deployments on a Kubernetes work pool (production).

    PREFECT_API_URL=https://prefect.example/api python -m flows.deploy \
        --image registry.example/pipeline:0.1.0 --pool training --artifacts s3://ml-artifacts/pipeline

The image (Dockerfile) holds this code, so nothing is built or pushed here. Flow-run pods
get PIPELINE_LAUNCHER=kubernetes from the pool's base job template, so each stage becomes
an indexed Job; artifacts must live where every pod can reach them (`paths.root` on S3).
"""
from __future__ import annotations

import argparse

from flows.serve import RETRAIN_CRON
from flows.training import retrain, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="pinned image, e.g. registry/pipeline:0.1.0")
    parser.add_argument("--pool", default="training", help="Kubernetes work pool name")
    parser.add_argument("--artifacts", required=True, help="paths.root for every run, e.g. s3://bucket/prefix")
    parser.add_argument("--cron", default=RETRAIN_CRON, help="retrain schedule")
    args = parser.parse_args(argv)
    defaults = {"params": {"launcher": "kubernetes", "extra_overrides": [f"paths.root={args.artifacts}"]}}
    common = dict(work_pool_name=args.pool, image=args.image, build=False, push=False, parameters=defaults)
    train.deploy(name="train", **common)
    retrain.deploy(name="retrain", cron=args.cron, **common)


if __name__ == "__main__":
    main()
