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

import pytest

from tests.k8s_standin.fixture import StandIn, node_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.k8s_standin", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True, type=Path, help="where to write the kubeconfig")
    parser.add_argument("--logdir", type=Path, help="pod logs and each pod's files: container spec, /etc/hosts, "
                        "resolv.conf, volumes (default: a temporary folder)")
    parser.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu the one node offers")
    args = parser.parse_args(argv)
    try:
        node = node_settings(gpus=args.gpus)  # checks the image is built; builds the fakes image on it
    except pytest.fail.Exception as err:  # the fixture's way of saying so, meant for a test report
        print(f"python -m tests.k8s_standin: {err.msg}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="k8s-standin-") as scratch:
        standin = StandIn(args.logdir or Path(scratch), node=node)
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
