"""`make run S3=1`: the production storage path on one machine, against a local S3 (moto).

Starts moto's S3 server on 127.0.0.1 (a free port), creates a bucket, uploads the builtin
digits as an ImageFolder of PNGs, then runs the whole pipeline (`pipeline run`) with
everything on s3://: the source, `paths.root` (prepared data, checkpoints, models, model
card, reports), the registry with its champion pointer, and the DVC remote. The code is
the one production runs; only the standard AWS environment differs (dummy credentials and
`AWS_ENDPOINT_URL`). Prints what landed in the bucket, then stops the server.

    make run S3=1
    make run S3=1 ARGS="--set pretrain.epochs=1 --set finetune.epochs=4"
    python scripts/s3_demo.py --set pretrain.epochs=1     # the same, without make
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.localserver import free_port, start_moto

BUCKET = "pipeline-demo"
ROOT = Path(__file__).resolve().parent.parent


def upload_digits(fs, prefix: str) -> int:
    """The builtin digits as `<class>/<n>.png`: the layout a team's own images would have."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    files = {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        buffer = io.BytesIO()
        Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8)).save(buffer, format="PNG")
        files[f"{prefix}/{label}/{index:04d}.png"] = buffer.getvalue()
    fs.pipe(files)  # concurrent PUTs
    return len(files)


def main(args: list[str]) -> int:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Standard AWS variables only: the pipeline has no S3 settings of its own to set.
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "demo-access-key",  # moto accepts any; real runs use the AWS chain
        "AWS_SECRET_ACCESS_KEY": "demo-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    log = Path(tempfile.gettempdir()) / f"pipeline-moto-{port}.log"
    print(f"[s3-demo] starting moto S3 on {endpoint} (log: {log})", flush=True)
    server = start_moto(port, log)
    try:
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        started = time.perf_counter()
        count = upload_digits(fs, f"{BUCKET}/source/digits")
        print(f"[s3-demo] uploaded {count} images to s3://{BUCKET}/source/digits in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        command = [sys.executable, "-m", "pipeline", "run",
                   "--set", f"data.source=s3://{BUCKET}/source/digits",
                   "--set", f"paths.root=s3://{BUCKET}/artifacts",
                   "--set", f"paths.registry=s3://{BUCKET}/registry",
                   "--set", f"paths.dvc_remote=s3://{BUCKET}/dvc", *args]
        print("[s3-demo] " + " ".join(command[2:]), flush=True)
        code = subprocess.run(command, cwd=ROOT).returncode
        fs.invalidate_cache()
        print(f"\n[s3-demo] s3://{BUCKET} after the run:")
        for path, info in sorted(fs.find(BUCKET, detail=True).items()):
            if "/source/digits/" not in path and "/dvc/files/" not in path:
                print(f"  {info['size']:>10,d}  s3://{path}")
        dvc_objects = fs.find(f"{BUCKET}/dvc/files")
        print(f"  (not listed: {count} source images; {len(dvc_objects)} DVC objects: the source snapshot)")
        if fs.exists(f"{BUCKET}/registry/champion.json"):
            print(f"\n[s3-demo] champion pointer: {fs.cat_file(f'{BUCKET}/registry/champion.json').decode()}")
        return code
    finally:
        server.terminate()
        server.wait(timeout=30)
        print("[s3-demo] moto S3 stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
