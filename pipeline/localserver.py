"""Local server processes (Prefect, moto, the Kubernetes stand-in): a free port, and waiting until they answer."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerNotReady(RuntimeError):
    """The process exited, or its endpoint did not answer in time; the message says which."""


def wait_until_answers(process: subprocess.Popen, url: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Return once `url` answers; raise ServerNotReady if `process` dies or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerNotReady(f"exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(poll_s)
    raise ServerNotReady(f"did not answer on {url} within {timeout_s:.0f} s")


def start_moto(port: int, log: Path | None = None) -> subprocess.Popen:
    """moto's S3 server as its own process on 127.0.0.1:`port`, answering; output to `log` or dropped."""
    out = log.open("w") if log else subprocess.DEVNULL
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_answers(server, f"http://127.0.0.1:{port}/moto-api/", timeout_s=60, poll_s=0.2)
    except ServerNotReady as exc:
        server.terminate()
        raise RuntimeError(f"moto server {exc}" + (f"; see {log}" if log else "")) from None
    return server
