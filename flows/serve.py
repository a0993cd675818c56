"""`make ui`: Prefect server + UI on 127.0.0.1:4200, serving the `train` and `retrain` deployments.

    make ui                       # then open http://127.0.0.1:4200 -> Deployments -> train -> Run
    PIPELINE_UI_PORT=4300 make ui                # another port (4200 taken, or a second clone)
    PIPELINE_RETRAIN_CRON="0 3 * * *" make ui    # daily instead of weekly

`train` is manual (the UI's Run button renders TrainingParameters as a form); `retrain`
runs on a cron schedule and retrains only when the data changed or `force` is set.

`make ui` owns its server: it serves deployments only to the `prefect server` process it started
itself. A port that is already taken (another clone's `make ui`, any other program) is exit 2 with
one line naming PIPELINE_UI_PORT, and nothing is served: a health check answered by someone else's
server on that port is never taken for ours (the server counts as up only once the process we
started, or a child of it, is the one listening on the port).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from pipeline.localserver import ServerNotReady, wait_until_answers

HOST, DEFAULT_PORT = "127.0.0.1", 4200
PORT_VARIABLE = "PIPELINE_UI_PORT"
RETRAIN_CRON = os.environ.get("PIPELINE_RETRAIN_CRON", "0 3 * * 1")  # Mondays 03:00 UTC


class PortError(RuntimeError):
    """PIPELINE_UI_PORT is not a port number, or the port is taken: exit 2, naming the variable."""


def ui_port(environ: dict[str, str] | None = None) -> int:
    """PIPELINE_UI_PORT (default 4200), validated."""
    raw = (os.environ if environ is None else environ).get(PORT_VARIABLE) or str(DEFAULT_PORT)
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise PortError(f"{PORT_VARIABLE}={raw!r} is not a TCP port (1-65535)")
    return port


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR, as uvicorn binds: a port in
    TIME_WAIT counts as free, one with a listener, on this address or on all addresses, does not)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _busy(port: int) -> PortError:
    return PortError(f"port {port} on {HOST} is already in use (another `make ui` or another program): "
                     f"stop it, or choose a free port with {PORT_VARIABLE}, e.g. `{PORT_VARIABLE}={port + 1} make ui`. "
                     "Nothing was served.")


def owns_port(process: subprocess.Popen, port: int) -> bool:
    """Whether `process` (or one of its children) is alive and has a TCP socket listening on `port`
    (psutil, a dependency of DVC)."""
    import psutil

    if process.poll() is not None:
        return False
    try:
        parent = psutil.Process(process.pid)
        tree = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in tree:
        try:
            connections = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections):
            return True
    return False


def wait_until_owned(process: subprocess.Popen, host: str, port: int, timeout_s: float, poll_s: float = 0.5) -> None:
    """Return once `process` itself listens on host:port and its API answers there; ServerNotReady if it
    exits first (e.g. the port was taken after our check) or `timeout_s` passes. An answer from any
    other server on the port never counts."""
    deadline = time.monotonic() + timeout_s
    while not owns_port(process, port):
        if process.poll() is not None:
            raise ServerNotReady(f"exited with {process.returncode}")
        if time.monotonic() >= deadline:
            raise ServerNotReady(f"was not listening on {host}:{port} within {timeout_s:.0f} s")
        time.sleep(poll_s)
    wait_until_answers(process, f"http://{host}:{port}/api/health", max(deadline - time.monotonic(), 1), poll_s)
    if not owns_port(process, port):  # it answered, but is it still ours?
        raise ServerNotReady(f"stopped listening on {host}:{port}")


def start_server(host: str = HOST, port: int | None = None, timeout_s: float = 120) -> subprocess.Popen:
    """Start `prefect server start` on host:port and wait until *it* (not another server) answers.
    A taken port is PortError before anything starts (or after, if it was taken in between)."""
    port = ui_port() if port is None else port
    if not port_is_free(host, port):
        raise _busy(port)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)])
    try:
        wait_until_owned(server, host, port, timeout_s, poll_s=0.5)
    except ServerNotReady as exc:
        server.terminate()
        server.wait(30)
        if not port_is_free(host, port):  # lost a race for the port: same answer as the check above
            raise _busy(port) from None
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
    try:
        port = ui_port()
        server = start_server(HOST, port)
    except PortError as exc:
        print(f"make ui: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    os.environ["PREFECT_API_URL"] = f"http://{HOST}:{port}/api"
    print(f"Prefect UI: http://{HOST}:{port}  (Ctrl-C stops server and deployments)", flush=True)
    try:
        serve_deployments()
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
