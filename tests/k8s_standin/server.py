"""HTTP front of the stand-in: the Kubernetes REST API as far as this project and kubectl use it.

Discovery (so the real kubectl works), create/get/list/watch/patch/update/delete for the
kinds in resources.KINDS, and pod logs. Every object written goes through admission.py
(decoding, field validation against the official 1.32 schemas, rules.api_rules) and every
failure answers a Status object with the real code: 400 undecodable, 404, 405, 409, 415,
422 naming the fields; a bug in the stand-in answers 500, never a dropped connection.
Faults queued with `fail_next` answer before any handling, so a test can count that no
retry followed.
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from tests.k8s_standin import resources, schema
from tests.k8s_standin.admission import decode, invalid, validate
from tests.k8s_standin.cluster import Cluster
from tests.k8s_standin.patch import merge_patch, strategic_merge_patch
from tests.k8s_standin.resources import BY_PATH, Kind
from tests.k8s_standin.rules import api_rules, apply_defaults  # noqa: F401  (api_rules: tests import it here)
from tests.k8s_standin.store import ApiError, field_selector, label_selector, random_suffix

SCHEMA_VERSION = schema.SCHEMA_VERSION
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                 "generation", "managedFields", "selfLink")
STATUS_KINDS = {"jobs", "pods", "services", "deployments", "namespaces"}  # status is a subresource: writes keep it


def status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return ApiError(code, reason, message, details).status()


def not_found(kind: Kind, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{kind.group_resource} "{name}" not found',
                    {"name": name, "group": kind.group, "kind": kind.plural})


class StandInServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cluster: Cluster):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.cluster = cluster
        self.faults: list[tuple[str, str, int]] = []
        # (verb, resource, ns, name, user): user is the bearer token, which names the caller here.
        self.requests: list[tuple[str, str, str, str | None, str | None]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # ends watches and followed logs
        self.host = f"127.0.0.1:{self.server_address[1]}"
        cluster.serve_api(self.server_address[1])


def parse_route(path: str) -> tuple[Kind, str | None, str | None, str | None] | None:
    """/api/v1/..., /apis/<group>/<version>/...: (kind, namespace, name, subresource)."""
    m = re.fullmatch(r"/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))/(?P<rest>.+)", path)
    if not m:
        return None
    group, version = (m["group"] or "", m["version"] or m["core"])
    segs = m["rest"].split("/")
    ns = None
    if segs[0] == "namespaces" and len(segs) >= 3 and (group, version, segs[2]) in BY_PATH:
        ns, segs = segs[1], segs[2:]
    kind = BY_PATH.get((group, version, segs[0]))
    if kind is None or len(segs) > 3 or (ns is not None and not kind.namespaced):
        return None
    return kind, ns, (segs[1] if len(segs) > 1 else None), (segs[2] if len(segs) > 2 else None)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, like the real server
    server: StandInServer

    def log_message(self, *args) -> None:  # quiet: tests read the request list instead
        pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")

    # ---- plumbing ----------------------------------------------------------------------------
    def _handle(self, method: str) -> None:
        self._warnings: list[str] = []
        self._started = False  # response headers sent: an error can no longer be answered
        try:
            try:
                body = self._read_body()
            except (ValueError, OSError) as err:
                self.close_connection = True  # the framing is broken: nothing after it can be trusted
                raise ApiError(400, "BadRequest", f"unable to read the request body: {err}") from None
            self._route(method, body)
        except ApiError as err:
            if not self._started:
                self._send(err.code, err.status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - a stand-in bug answers 500, never a dropped connection
            if not self._started:
                self._send(500, status_body(500, "InternalError", f"stand-in error: {err!r}"))

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"x", 16)
                if size == 0:
                    while self.rfile.readline(1024).strip():  # trailers
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline(16)  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, code: int, obj, content_type: str = "application/json") -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self._started = True
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for warning in self._warnings:
            self.send_header("Warning", f"299 - {json.dumps(warning)}")
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, content_type: str) -> None:
        self._started = True
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        if data:  # an empty chunk would end the stream
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _table_wanted(self) -> bool:
        return "as=Table" in (self.headers.get("Accept") or "")

    # ---- routing -----------------------------------------------------------------------------
    def _route(self, method: str, body: bytes) -> None:
        url = urlparse(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if method == "GET" and self._discovery(path):
            return
        route = parse_route(path)
        if route is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        kind, ns, name, sub = route
        if sub not in (None, "log") or (sub == "log" and kind.plural != "pods"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection"}.get(
            method, "watch" if query.get("watch") in ("true", "1") else "get" if name else "list")
        if kind.namespaced and ns is None and verb not in ("list", "watch"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if verb not in (("get",) if sub else kind.verbs) or (verb == "create" and name):
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        resource = f"{kind.plural}/{sub}" if sub else kind.plural
        with self.server.lock:
            user = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip() or None
            self.server.requests.append((verb, resource, ns, name, user))
            fault = next((f for f in self.server.faults if f[:2] == (verb, resource)), None)
            if fault:
                self.server.faults.remove(fault)
        if fault:
            return self._fault(fault[2], verb, kind, ns, name)
        handler = self._log if sub else getattr(self, f"_{verb}")
        handler(kind, ns, name, query, body)

    def _discovery(self, path: str) -> bool:
        doc = None
        if path == "/version":
            doc = resources.SERVER_VERSION
        elif path == "/api":
            doc = resources.api_versions(self.server.host)
        elif path == "/apis":
            doc = resources.api_groups()
        elif path in ("/healthz", "/livez", "/readyz"):
            self._send(200, b"ok", "text/plain")
            return True
        elif path == "/openapi/v3":
            doc = resources.openapi_v3_root()
        elif path.startswith("/openapi/v3/"):
            doc = resources.openapi_v3(path[len("/openapi/v3/"):])
        elif re.fullmatch(r"/apis/[^/]+", path):
            doc = resources.api_group(path.split("/")[2])
        elif path == "/api/v1" or re.fullmatch(r"/apis/[^/]+/[^/]+", path):
            parts = path.split("/")
            doc = resources.resource_list(*(("", "v1") if path == "/api/v1" else (parts[2], parts[3])))
        else:
            return False
        if doc is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        self._send(200, doc)
        return True

    def _fault(self, code: int, verb: str, kind: Kind, ns: str | None, name: str | None) -> None:
        if code == 403:
            msg = (f'{kind.group_resource} is forbidden: User "system:serviceaccount:{ns}:pipeline-flow-run" cannot '
                   f'{verb} resource "{kind.plural}" in API group "{kind.group}" in the namespace "{ns}"')
            return self._send(403, status_body(403, "Forbidden", msg, {"group": kind.group, "kind": kind.plural}))
        if code == 422:
            problem = ("spec.template.spec.containers[0].resources", "Invalid value: exceeded quota: gpu-quota")
            return self._send(422, invalid(kind, name or "?", [problem]).status())
        self._send(code, status_body(code, "InternalError", f"injected HTTP {code}"))

    # ---- verbs -------------------------------------------------------------------------------------
    def _create(self, kind: Kind, ns, name, query, body) -> None:
        obj = decode(body, self.headers.get("Content-Type"), kind)
        meta = obj["metadata"]
        if kind.namespaced:
            if meta.get("namespace") not in (None, "", ns):
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                                                  "namespace sent on the request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        for key in SERVER_FIELDS:
            meta.pop(key, None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + random_suffix()
        self._warnings += validate(obj, kind, query.get("fieldValidation"))
        cluster = self.server.cluster
        with cluster.lock:
            namespace = cluster.store.get("namespaces", "", ns) if ns else None
            if namespace and namespace["metadata"].get("deletionTimestamp"):
                raise ApiError(403, "Forbidden", f"unable to create new content in namespace {ns} because it is "
                                                 "being terminated", {"name": meta["name"], "kind": kind.plural})
            if cluster.store.get(kind.plural, ns or "", meta["name"]) is not None:
                raise ApiError(409, "AlreadyExists", f'{kind.group_resource} "{meta["name"]}" already exists',
                               {"name": meta["name"], "group": kind.group, "kind": kind.plural})
            meta["uid"] = str(uuid.uuid4())
            apply_defaults(obj)
            self._send(201, cluster.create(kind.plural, obj))

    def _get(self, kind: Kind, ns, name, query, body) -> None:
        with self.server.cluster.lock:
            obj = self.server.cluster.store.get(kind.plural, ns or "", name)
            if obj is None:
                raise not_found(kind, name)
            self._send(200, resources.table(kind.plural, [obj], obj["metadata"]["resourceVersion"])
                       if self._table_wanted() else obj)

    def _matching(self, kind: Kind, ns, query):
        labels = label_selector(query.get("labelSelector", ""))
        fields = field_selector(query.get("fieldSelector", ""), kind.plural)
        return lambda o: (ns is None or o["metadata"].get("namespace") == ns) and fields(o) \
            and labels(o["metadata"].get("labels") or {})

    def _list(self, kind: Kind, ns, name, query, body) -> None:
        wanted = self._matching(kind, ns, query)
        store = self.server.cluster.store
        with store.lock:
            items = sorted((o for o in store.items(kind.plural) if wanted(o)),
                           key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
            revision = str(store.revision)
            if self._table_wanted():
                return self._send(200, resources.table(kind.plural, items, revision))
            self._send(200, {"apiVersion": kind.api_version, "kind": f"{kind.kind}List",
                             "metadata": {"resourceVersion": revision}, "items": items})

    def _watch(self, kind: Kind, ns, name, query, body) -> None:
        """Chunked JSON watch events, one object per line, from a resourceVersion or from now."""
        wanted = self._matching(kind, ns, query)
        store, start = self.server.cluster.store, query.get("resourceVersion")
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        with store.lock:
            if start in (None, "", "0"):  # no version: the current state as ADDED events first
                pending = [("ADDED", json.loads(json.dumps(o))) for o in store.items(kind.plural) if wanted(o)]
                revision = store.revision
            elif not start.isdigit():
                raise ApiError(400, "BadRequest", f"invalid resource version: {start!r}")
            else:
                revision, pending = int(start), []
                oldest = store.events[0][0] if store.events else store.revision + 1
                if revision < oldest - 1:
                    expired = f"too old resource version: {revision} ({oldest - 1})"
                    pending = [("ERROR", status_body(410, "Expired", expired))]
        self._start_stream("application/json")
        as_table = self._table_wanted()  # `kubectl get -w`: each event carries a one-row Table
        while True:
            for event_type, obj in pending:
                if as_table and event_type != "ERROR":
                    obj = resources.table(kind.plural, [obj], obj["metadata"]["resourceVersion"])
                self._chunk(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")
            if (pending and pending[-1][0] == "ERROR") or self.server.stopping.is_set() or time.monotonic() > deadline:
                break
            with store.changed:
                if not store.events or store.events[-1][0] <= revision:
                    store.changed.wait(0.5)
                pending = [(t, o) for r, t, plural, o in store.events
                           if r > revision and plural == kind.plural and wanted(o)]
                revision = store.revision
        self._end_stream()

    @staticmethod
    def _delete_options(query: dict, body: bytes) -> tuple[str | None, int | None]:
        """propagationPolicy and gracePeriodSeconds from a DeleteOptions body or the query."""
        try:
            options = json.loads(body) if body else {}
        except ValueError as err:
            raise ApiError(400, "BadRequest", f"error decoding DeleteOptions: {err}") from None
        policy = options.get("propagationPolicy") or query.get("propagationPolicy")
        if options.get("orphanDependents") is True or query.get("orphanDependents") == "true":
            policy = "Orphan"
        grace = options.get("gracePeriodSeconds", query.get("gracePeriodSeconds"))
        return policy, None if grace is None else int(grace)

    def _delete(self, kind: Kind, ns, name, query, body) -> None:
        policy, grace = self._delete_options(query, body)
        cluster = self.server.cluster
        with cluster.lock:
            try:
                obj, gone = cluster.delete(kind.plural, ns or "", name, policy, grace)
            except KeyError:
                raise not_found(kind, name) from None
            if not gone:  # still terminating (pod grace period, Foreground): the object, as the server answers
                return self._send(200, obj)
            self._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                             "details": {"name": name, "group": kind.group, "kind": kind.plural,
                                         "uid": obj["metadata"]["uid"]}})

    def _deletecollection(self, kind: Kind, ns, name, query, body) -> None:
        policy, grace = self._delete_options(query, body)
        wanted, cluster = self._matching(kind, ns, query), self.server.cluster
        with cluster.lock:
            items = [o for o in cluster.store.items(kind.plural) if wanted(o)]
            for obj in items:
                if cluster.store.get(kind.plural, obj["metadata"].get("namespace", ""), obj["metadata"]["name"]):
                    cluster.delete(kind.plural, obj["metadata"].get("namespace", ""), obj["metadata"]["name"],
                                   policy, grace)
            self._send(200, {"apiVersion": kind.api_version, "kind": f"{kind.kind}List",
                             "metadata": {"resourceVersion": str(cluster.store.revision)}, "items": items})

    def _update(self, kind: Kind, ns, name, query, body) -> None:
        self._write(kind, ns, name, query, lambda current: decode(body, self.headers.get("Content-Type"), kind))

    def _patch(self, kind: Kind, ns, name, query, body) -> None:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        apply = {"application/merge-patch+json": merge_patch,
                 "application/strategic-merge-patch+json": strategic_merge_patch}.get(ctype)
        if apply is None:
            raise ApiError(415, "UnsupportedMediaType", f"the stand-in does not support patch type {ctype!r} "
                           "(merge and strategic merge patches only)")
        try:
            patch = json.loads(body)
        except ValueError as err:
            raise ApiError(400, "BadRequest", f"error decoding patch: {err}") from None
        self._write(kind, ns, name, query, lambda current: apply(json.loads(json.dumps(current)), patch))

    def _write(self, kind: Kind, ns, name, query, make) -> None:
        """update/patch: the new object keeps server-owned metadata and status, then is validated."""
        cluster = self.server.cluster
        with cluster.lock:
            current = cluster.store.get(kind.plural, ns or "", name)
            if current is None:
                raise not_found(kind, name)
            new = make(current)
            meta = new.setdefault("metadata", {})
            if meta.get("name", name) != name:
                raise ApiError(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match "
                                                  f"the name on the URL ({name})")
            version = meta.get("resourceVersion")
            if version and version != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {kind.group_resource} "{name}": '
                               "the object has been modified; please apply your changes to the latest version "
                               "and try again", {"name": name, "group": kind.group, "kind": kind.plural})
            for key in SERVER_FIELDS + ("namespace",):
                if key in current["metadata"]:
                    meta[key] = current["metadata"][key]
                else:
                    meta.pop(key, None)
            meta["name"] = name
            if kind.plural in STATUS_KINDS and "status" in current:
                new["status"] = current["status"]
            self._warnings += validate(new, kind, query.get("fieldValidation"))
            if kind.plural == "jobs":
                for field in ("template", "selector", "completionMode"):
                    if new["spec"].get(field) != current["spec"].get(field):
                        raise invalid(kind, name, [(f"spec.{field}", "Invalid value: field is immutable")])
            if new.get("spec") != current.get("spec") and "generation" in current["metadata"]:
                meta["generation"] = current["metadata"]["generation"] + 1
            current.clear()
            current.update(new)  # in place: controllers hold this dict
            cluster.store.touch(kind.plural, current)
            self._send(200, current)

    def _log(self, kind: Kind, ns, name, query, body) -> None:
        """Pod logs; `follow=true` streams until the container's process has exited."""
        cluster = self.server.cluster
        with cluster.lock:
            pod = cluster.pods.get((ns, name))
            if pod is None:
                raise not_found(kind, name)
            container = pod.obj["spec"]["containers"][0]["name"]
            if query.get("container") not in (None, container):
                raise ApiError(400, "BadRequest", f"container {query['container']} is not valid for pod {name}")
            if query.get("previous") in ("true", "1"):  # restartPolicy Never: there is never a previous one
                raise ApiError(400, "BadRequest", f'previous terminated container "{container}" in pod "{name}" '
                                                  "not found")
            waiting = (pod.obj["status"].get("containerStatuses") or [{}])[0].get("state", {}).get("waiting", {})
            if pod.proc is None:
                raise ApiError(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: '
                                                  f'{waiting.get("reason", "ContainerCreating")}')
        follow = query.get("follow") in ("true", "1")
        tail = int(query["tailLines"]) if query.get("tailLines") else None
        self._start_stream("text/plain")
        with open(pod.log_path, "rb") as src:
            if tail is not None:
                data = src.read()
                self._chunk(b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b"")
            while True:
                done = pod.proc.poll() is not None  # read after checking: nothing is lost
                data = src.read(65536)
                if data:
                    self._chunk(data)
                elif done or not follow or self.server.stopping.is_set():
                    break
                else:
                    time.sleep(0.05)
        self._end_stream()
