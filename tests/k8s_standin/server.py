"""HTTP front of the stand-in: the Kubernetes REST paths the launcher uses, nothing more.

Every object a client creates is validated against the official schema (kubernetes-validate,
strict) plus the few API-server rules the launcher's manifests depend on; failures answer
422 with a Status naming the field, as the real API server does. Faults queued with
`fail_next` answer before any handling, so a test can count that no retry followed.
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import kubernetes_validate
from kubernetes_validate.utils import ValidationError

from tests.k8s_standin.cluster import Cluster

SCHEMA_VERSION = "1.32.0"
PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>batch)/v1)/namespaces/(?P<ns>[^/]+)/(?P<res>[a-z]+)"
                  r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[a-z]+))?)?$")
KINDS = {"jobs": "Job", "services": "Service", "pods": "Pod"}


def status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details or {}, "code": code}


def api_rules(obj: dict) -> list[tuple[str, str]]:
    """A few API-server validations that a JSON schema cannot express: (field, message)."""
    problems = []
    if obj.get("kind") == "Job":
        spec = obj["spec"]
        pod = spec["template"]["spec"]
        if pod.get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append(("spec.template.spec.restartPolicy", "Unsupported value: must be Never or OnFailure"))
        if spec.get("podFailurePolicy") and pod.get("restartPolicy") != "Never":
            problems.append(("spec.podFailurePolicy", "only allowed when restartPolicy is Never"))
        if spec.get("completionMode") == "Indexed" and not spec.get("completions"):
            problems.append(("spec.completions", "Required value: when completionMode is Indexed"))
    name = obj.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        problems.append(("metadata.name", f"Invalid value: {name!r}: must be a DNS-1123 label"))
    return problems


class StandInServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cluster: Cluster):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.cluster = cluster
        self.faults: list[tuple[str, str, int]] = []
        self.requests: list[tuple[str, str, str, str | None]] = []  # (verb, resource, ns, name)
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked log streams, like the real server
    server: StandInServer

    def log_message(self, *args) -> None:  # quiet: tests read the request list instead
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._body()
        m = PATH.match(url.path)
        if not m or m["res"] not in KINDS or (m["sub"] and m["sub"] != "log"):
            return self._send(404, status_body(404, "NotFound", f"the stand-in does not serve {url.path}"))
        ns, res, name = m["ns"], m["res"], m["name"]
        resource = f"{res}/{m['sub']}" if m["sub"] else res
        verb = {"POST": "create", "DELETE": "delete" if name else "deletecollection"}.get(
            method, "watch" if query.get("watch") in ("true", "1") else "get" if name else "list")
        with self.server.lock:
            self.server.requests.append((verb, resource, ns, name))
            fault = next((f for f in self.server.faults if f[:2] == (verb, resource)), None)
            if fault:
                self.server.faults.remove(fault)
        if fault:
            return self._fault(fault[2], verb, res, m["group"] or "", ns, name)
        handler = getattr(self, f"_{verb}_log" if m["sub"] else f"_{verb}", None)
        if handler is None:
            return self._send(405, status_body(405, "MethodNotAllowed", f"stand-in does not support {verb}"))
        handler(ns, res, name, query, body)

    def _body(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else None

    def _send(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fault(self, code: int, verb: str, res: str, group: str, ns: str, name: str | None) -> None:
        full = f"{res}.{group}" if group else res
        if code == 403:
            msg = (f'{full} is forbidden: User "system:serviceaccount:{ns}:prefect-worker" cannot {verb} '
                   f'resource "{res}" in API group "{group}" in the namespace "{ns}"')
            return self._send(403, status_body(403, "Forbidden", msg, {"group": group, "kind": res}))
        if code == 422:
            causes = [{"reason": "FieldValueInvalid", "field": "spec.template.spec.containers[0].resources",
                       "message": "exceeded quota: gpu-quota"}]
            msg = f'{KINDS[res]}.{group or "core"} "{name or "?"}" is invalid: {causes[0]["field"]}: {causes[0]["message"]}'
            return self._send(422, status_body(422, "Invalid", msg, {"kind": res, "causes": causes}))
        self._send(code, status_body(code, "InternalError", f"injected HTTP {code}"))

    def _create(self, ns, res, name, query, body) -> None:
        body = body or {}
        body.setdefault("metadata", {}).setdefault("namespace", ns)
        problems = []
        try:
            kubernetes_validate.validate(body, SCHEMA_VERSION, strict=True)
        except ValidationError as err:
            problems.append((".".join(str(p) for p in err.absolute_path) or "<root>", err.message))
        problems += api_rules(body) if not problems else []
        if body["metadata"]["namespace"] != ns:
            problems.append(("metadata.namespace", "does not match the namespace of the request"))
        if problems:
            causes = [{"reason": "FieldValueInvalid", "field": f, "message": msg} for f, msg in problems]
            text = "; ".join(f"{f}: {msg}" for f, msg in problems)
            return self._send(422, status_body(422, "Invalid", f'{body.get("kind")} "{body["metadata"].get("name")}" '
                                               f"is invalid: {text}", {"kind": res, "causes": causes}))
        cluster = self.server.cluster
        key = (ns, body["metadata"]["name"])
        with cluster.lock:
            store = cluster.jobs if res == "jobs" else cluster.services if res == "services" else None
            if store is None:
                return self._send(405, status_body(405, "MethodNotAllowed", "create pods directly is not supported"))
            if key in store:
                return self._send(409, status_body(409, "AlreadyExists", f'{res} "{key[1]}" already exists'))
            created = cluster.add_job(body) if res == "jobs" else cluster.add_service(body)
            self._send(201, created)

    def _objects(self, ns: str, res: str) -> list[dict]:
        cluster = self.server.cluster
        if res == "jobs":
            return [s.obj for (n, _), s in cluster.jobs.items() if n == ns]
        if res == "services":
            return [s for (n, _), s in cluster.services.items() if n == ns]
        return [p.obj for (n, _), p in cluster.pods.items() if n == ns]

    def _get(self, ns, res, name, query, body) -> None:
        with self.server.cluster.lock:
            found = [o for o in self._objects(ns, res) if o["metadata"]["name"] == name]
            if found:
                return self._send(200, found[0])
        self._send(404, status_body(404, "NotFound", f'{res} "{name}" not found', {"name": name, "kind": res}))

    def _list(self, ns, res, name, query, body) -> None:
        wanted = _selector(query.get("labelSelector", ""))
        with self.server.cluster.lock:
            items = [o for o in self._objects(ns, res) if wanted(o["metadata"].get("labels") or {})]
            self._send(200, {"apiVersion": "batch/v1" if res == "jobs" else "v1", "kind": f"{KINDS[res]}List",
                             "metadata": {"resourceVersion": "1"}, "items": items})

    def _delete(self, ns, res, name, query, body) -> None:
        cluster = self.server.cluster
        policy = (body or {}).get("propagationPolicy") or query.get("propagationPolicy")
        with cluster.lock:
            if res == "jobs" and (ns, name) in cluster.jobs:
                return self._send(200, cluster.delete_job((ns, name), policy))
            if res == "services" and (ns, name) in cluster.services:
                return self._send(200, cluster.services.pop((ns, name)))
        self._send(404, status_body(404, "NotFound", f'{res} "{name}" not found', {"name": name, "kind": res}))

    def _get_log(self, ns, res, name, query, body) -> None:
        """`follow=true` streams chunks until the container's process has exited."""
        cluster = self.server.cluster
        with cluster.lock:
            pod = cluster.pods.get((ns, name))
        if pod is None or pod.proc is None:
            reason = "not found" if pod is None else "is waiting to start"
            return self._send(404 if pod is None else 400, status_body(400, "BadRequest", f'pod "{name}" {reason}'))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        follow = query.get("follow") in ("true", "1")
        try:
            with open(pod.log_path, "rb") as src:
                while True:
                    done = pod.proc.poll() is not None  # read after checking: nothing is lost
                    data = src.read(65536)
                    if data:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    elif done or not follow:
                        break
                    else:
                        time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _selector(text: str):
    """Equality-based label selectors: a=b, a==b, a!=b, and bare `a` (exists)."""
    terms = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"([^!=]+?)\s*(==|=|!=)\s*(.*)", part)
        terms.append((m[1], m[2], m[3]) if m else (part, "exists", None))

    def match(labels: dict) -> bool:
        for key, op, value in terms:
            if op == "exists" and key not in labels:
                return False
            if op in ("=", "==") and labels.get(key) != value:
                return False
            if op == "!=" and labels.get(key) == value:
                return False
        return True
    return match
