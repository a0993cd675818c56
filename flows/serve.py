"""`make ui`: Prefect server + UI on 127.0.0.1:4200, serving the `train` and `retrain` deployments.

    make ui                       # then open http://127.0.0.1:4200 -> Deployments -> train -> Run
    PIPELINE_RETRAIN_CRON="0 3 * * *" make ui    # daily instead of weekly

`train` is manual (the UI's Run button renders TrainingParameters as a form); `retrain`
runs on a cron schedule and retrains only when the data changed or `force` is set.
"""
from __future__ import annotations

import os
import subprocess
import sys

from pipeline.localserver import ServerNotReady, wait_until_answers

HOST, PORT = "127.0.0.1", int(os.environ.get("PIPELINE_UI_PORT", "4200"))
RETRAIN_CRON = os.environ.get("PIPELINE_RETRAIN_CRON", "0 3 * * 1")  # Mondays 03:00 UTC


def start_server(host: str = HOST, port: int = PORT, timeout_s: float = 120) -> subprocess.Popen:
    """Start `prefect server start` and wait until its API answers."""
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)])
    try:
        wait_until_answers(server, f"http://{host}:{port}/api/health", timeout_s, poll_s=1)
    except ServerNotReady as exc:
        server.terminate()
        raise RuntimeError(f"prefect server {exc}") from None
    return server


def serve_deployments() -> None:
    from prefect import serve

    from flows.training import retrain, train

    serve(
        train.to_deployment(name="train", description="Manual training run; parameters overlay params.yaml"),
        retrain.to_deployment(name="retrain", cron=RETRAIN_CRON,
                              description="Scheduled: retrains only if the data version changed (or force)"),
    )


def main() -> None:
    server = start_server()
    os.environ["PREFECT_API_URL"] = f"http://{HOST}:{PORT}/api"
    print(f"Prefect UI: http://{HOST}:{PORT}  (Ctrl-C stops server and deployments)", flush=True)
    try:
        serve_deployments()
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
