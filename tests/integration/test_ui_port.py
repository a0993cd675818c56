"""`make ui` owns its server (flows/serve.py): a taken PIPELINE_UI_PORT is exit 2 naming the variable with
nothing served, and an answer from a server it did not start is never taken for its own.

Real sockets on 127.0.0.1 only: a plain listening socket, and a foreign HTTP server that answers
/api/health like a Prefect server would (another clone's `make ui`).
"""
from __future__ import annotations

import http.server
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO_ROOT, subprocess_env
from pipeline.localserver import free_port


def _serve_ui(port: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m flows.serve`, what `make ui` runs, with PIPELINE_UI_PORT=port."""
    return subprocess.run([PYTHON, "-m", "flows.serve"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(PIPELINE_UI_PORT=port, PREFECT_HOME=str(home)))


@pytest.fixture
def held_port():
    """A port on 127.0.0.1 held by a plain listening socket (not ours, not HTTP)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


@pytest.fixture
def foreign_server():
    """Another "Prefect server" on 127.0.0.1: answers /api/health (and everything else) with 200."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _assert_busy_exit(done: subprocess.CompletedProcess, port: int) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "PIPELINE_UI_PORT" in done.stderr and str(port) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert "Prefect UI:" not in done.stdout  # nothing was served


def test_a_port_held_by_a_socket_is_exit_2_naming_the_variable(held_port, tmp_path):
    _assert_busy_exit(_serve_ui(str(held_port), tmp_path / "home"), held_port)


def test_a_foreign_server_answering_health_is_not_used(foreign_server, tmp_path):
    _assert_busy_exit(_serve_ui(str(foreign_server), tmp_path / "home"), foreign_server)


@pytest.mark.parametrize("value", ["abc", "0", "70000"])
def test_a_bad_port_value_is_exit_2_naming_the_variable(value, tmp_path):
    done = _serve_ui(value, tmp_path / "home", timeout=30)
    assert done.returncode == 2 and f"PIPELINE_UI_PORT={value!r}" in done.stderr, done.stderr


def test_port_taken_after_the_check_is_still_refused(foreign_server, tmp_path, monkeypatch):
    """The race: the port is free when checked, taken before `prefect server` binds it. Our server fails
    to start; the foreign server's healthy answer must not make start_server return."""
    from flows import serve

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    checks = iter([True])  # the first check "passes"; later ones are real
    real = serve.port_is_free
    monkeypatch.setattr(serve, "port_is_free", lambda host, port: next(checks, None) or real(host, port))
    with pytest.raises(serve.PortError, match="PIPELINE_UI_PORT"):
        serve.start_server(port=foreign_server, timeout_s=90)


@pytest.mark.slow
def test_the_server_it_starts_is_its_own(tmp_path, monkeypatch):
    from flows import serve

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    port = free_port()
    server = serve.start_server(port=port, timeout_s=120)
    try:
        assert serve.owns_port(server, port)
        assert not serve.port_is_free("127.0.0.1", port)
    finally:
        server.terminate()
        server.wait(30)
    assert not serve.owns_port(server, port)
