"""A loopback HTTP proxy in front of the S3 test server that injects faults on demand.

Point AWS_ENDPOINT_URL at `proxy.url` and every S3 request of this process and its
subprocesses passes through it. Faults: fail the next N requests with a given status and S3
error code (503 SlowDown, 500 InternalError), stall the next N (read timeouts), or deny a
bucket/key prefix (403 AccessDenied). Everything else is forwarded unchanged. The proxy
forwards the Host header as sent; the test server does not check signatures.
"""
from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
              "proxy-connection", "content-length"}


def error_body(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            "<RequestId>fault-proxy</RequestId></Error>").encode()


@dataclass
class Faults:
    fail_next: int = 0
    fail_status: int = 503
    fail_code: str = "SlowDown"
    stall_next: int = 0
    stall_s: float = 0.0
    denied_prefixes: list[str] = field(default_factory=list)
    requests: int = 0
    injected: int = 0
    log: list[str] = field(default_factory=list)


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.faults = Faults()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for large PUTs

            def log_message(self, *args):  # quiet
                pass

            def _relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                verdict = proxy._decide(self.command, self.path)
                if verdict is not None:
                    status, code, delay = verdict
                    if delay:
                        time.sleep(delay)
                    if status:
                        payload = b"" if self.command == "HEAD" else error_body(code, f"injected {code}")
                        self.send_response(status)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in HOP_BY_HOP:
                            self.send_header(key, value)
                    # HEAD answers carry the object's length but no body.
                    length_header = response.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length_header or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # A client that timed out on a stalled request has hung up: not worth a traceback.
        self.server.handle_error = lambda request, address: None
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _decide(self, method: str, path: str) -> tuple[int, str, float] | None:
        with self.lock:
            f = self.faults
            f.requests += 1
            for prefix in f.denied_prefixes:
                if path.lstrip("/").startswith(prefix):
                    f.injected += 1
                    f.log.append(f"403 AccessDenied {method} {path}")
                    return 403, "AccessDenied", 0.0
            if f.stall_next > 0:
                f.stall_next -= 1
                f.injected += 1
                f.log.append(f"stall {f.stall_s}s {method} {path}")
                return 0, "", f.stall_s
            if f.fail_next > 0:
                f.fail_next -= 1
                f.injected += 1
                f.log.append(f"{f.fail_status} {f.fail_code} {method} {path}")
                return f.fail_status, f.fail_code, 0.0
        return None

    def fail(self, count: int, status: int = 503, code: str = "SlowDown") -> None:
        with self.lock:
            self.faults.fail_next, self.faults.fail_status, self.faults.fail_code = count, status, code

    def stall(self, count: int, seconds: float) -> None:
        with self.lock:
            self.faults.stall_next, self.faults.stall_s = count, seconds

    def deny(self, prefix: str) -> None:
        """Answer 403 AccessDenied to every request under `bucket[/key-prefix]`."""
        with self.lock:
            self.faults.denied_prefixes.append(prefix)

    def clear(self) -> None:
        with self.lock:
            self.faults = Faults()

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
