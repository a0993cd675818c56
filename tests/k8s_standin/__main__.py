"""Run the stand-in by hand: `python -m tests.k8s_standin --kubeconfig FILE` (as root; `make image` first).

It listens on a free 127.0.0.1 port, writes a kubeconfig for it, prints the URL and serves
until SIGTERM or SIGINT; then it stops its pods' processes and exits 0. Then, e.g.:
    KUBECONFIG=FILE kubectl apply -k k8s/overlays/dev && KUBECONFIG=FILE kubectl get all -n ml-pipeline
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

from tests.k8s_standin.fixture import StandIn, node_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.k8s_standin", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True, type=Path, help="where to write the kubeconfig")
    parser.add_argument("--logdir", type=Path, help="pod logs and per-pod /tmp (default: a temporary folder)")
    parser.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu the one node offers")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="k8s-standin-") as scratch:
        standin = StandIn(args.logdir or Path(scratch), node=node_settings(gpus=args.gpus))
        try:
            standin.write_kubeconfig(args.kubeconfig)
            print(standin.host, flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            standin.close()  # kills every pod process it started
    return 0


if __name__ == "__main__":
    sys.exit(main())
