"""Generic object store: every object the stand-in serves, its resourceVersions and watch events.

Objects are plain dicts keyed by (resource, namespace, name); cluster-scoped ones use the
namespace "". One counter stamps every change, like etcd's revision, so a list's
resourceVersion is a valid start for a watch. The store shares the cluster's lock.
"""
from __future__ import annotations

import json
import re
import secrets
import threading
import uuid
from collections import deque
from datetime import datetime, timezone

# What the API server's name generator draws from (k8s.io/apimachinery/pkg/util/rand): no vowels.
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_suffix(n: int = 5) -> str:
    return "".join(secrets.choice(NAME_ALPHABET) for _ in range(n))


class ApiError(Exception):
    """An API answer other than success; the server turns it into a Status object."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "details": self.details, "code": self.code}


class Store:
    def __init__(self, lock: threading.RLock):
        self.lock = lock
        self.changed = threading.Condition(lock)
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.revision = 1
        self.events: deque = deque(maxlen=10000)  # (revision, type, resource, snapshot)

    def _stamp(self, obj: dict) -> None:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)

    def _emit(self, kind: str, resource: str, obj: dict) -> None:
        self.events.append((self.revision, kind, resource, json.loads(json.dumps(obj))))
        self.changed.notify_all()

    def add(self, resource: str, obj: dict) -> dict:
        meta = obj["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))  # the server may have drawn it already, for defaulting
        meta["creationTimestamp"] = now_iso()
        if "spec" in obj:
            meta["generation"] = 1
        self._stamp(obj)
        self.objects[(resource, meta.get("namespace", ""), meta["name"])] = obj
        self._emit("ADDED", resource, obj)
        return obj

    def touch(self, resource: str, obj: dict) -> None:
        """Record an in-place change (status, deletionTimestamp...) as a new revision."""
        self._stamp(obj)
        self._emit("MODIFIED", resource, obj)

    def remove(self, resource: str, obj: dict) -> None:
        meta = obj["metadata"]
        if self.objects.pop((resource, meta.get("namespace", ""), meta["name"]), None) is obj:
            self._stamp(obj)
            self._emit("DELETED", resource, obj)

    def get(self, resource: str, ns: str, name: str) -> dict | None:
        return self.objects.get((resource, ns, name))

    def items(self, resource: str | None = None, ns: str | None = None) -> list[dict]:
        return [o for (r, n, _), o in self.objects.items() if resource in (None, r) and ns in (None, n)]

    def find_uid(self, uid: str) -> tuple[str, dict] | None:
        for (resource, _, _), obj in self.objects.items():
            if obj["metadata"].get("uid") == uid:
                return resource, obj
        return None

    def dependents(self, ns: str, uid: str) -> list[tuple[str, dict]]:
        """Objects whose ownerReferences name `uid` (owners are same-namespace or cluster-scoped)."""
        return [(r, o) for (r, n, _), o in list(self.objects.items())
                if n in (ns, "") and any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences") or [])]


# ---- selectors ---------------------------------------------------------------------------
LABEL_TERM = re.compile(r"^\s*(!?)\s*([A-Za-z0-9./_-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*)|"
                        r"\s(in|notin)\s*\(([^)]*)\))?\s*$")
POD_FIELDS = {"status.phase", "spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
              "spec.serviceAccountName", "status.podIP", "spec.hostNetwork"}


def label_selector(text: str):
    """Equality- and set-based selectors: a=b, a==b, a!=b, a in (x,y), a notin (x,y), a, !a."""
    terms = []
    for part in _split_terms(text):
        m = LABEL_TERM.match(part)
        if not m or (m[1] and (m[3] or m[5])):
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}: invalid label selector")
        if m[1]:
            terms.append((m[2], "!", None))
        elif m[3]:
            terms.append((m[2], "!=" if m[3] == "!=" else "=", {m[4]}))
        elif m[5]:
            terms.append((m[2], m[5], {v.strip() for v in m[6].split(",") if v.strip()}))
        else:
            terms.append((m[2], "exists", None))

    def match(labels: dict) -> bool:
        for key, op, values in terms:
            if op == "exists":
                ok = key in labels
            elif op == "!":
                ok = key not in labels
            elif op in ("=", "in"):
                ok = key in labels and labels[key] in values
            else:  # != and notin also match objects without the label
                ok = labels.get(key) not in values
            if not ok:
                return False
        return True
    return match


def field_selector(text: str, resource: str):
    """The fields the real server indexes: metadata.name/namespace everywhere, a few per kind."""
    terms = []
    for part in _split_terms(text):
        m = re.fullmatch(r"\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*", part)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {part!r}")
        allowed = {"metadata.name", "metadata.namespace"} | (POD_FIELDS if resource == "pods" else set())
        allowed |= {"status.successful"} if resource == "jobs" else set()
        allowed |= {"type"} if resource == "secrets" else set()
        allowed |= {"involvedObject.name", "involvedObject.kind", "involvedObject.namespace", "involvedObject.uid",
                    "reason", "type"} if resource == "events" else set()
        if m[1] not in allowed:
            raise ApiError(400, "BadRequest", f'field label not supported: {m[1]}')
        terms.append((m[1], m[2] == "!=", m[3]))

    def match(obj: dict) -> bool:
        for path, negate, value in terms:
            if path == "status.successful":
                actual = str(obj.get("status", {}).get("succeeded", 0))
            else:
                actual = obj
                for part in path.split("."):
                    actual = actual.get(part) if isinstance(actual, dict) else None
                actual = "" if actual is None else str(actual).lower() if isinstance(actual, bool) else str(actual)
            if (actual == value) == negate:
                return False
        return True
    return match


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses: `a in (x,y),b` is two terms."""
    parts, depth, cur = [], 0, ""
    for ch in text or "":
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]
