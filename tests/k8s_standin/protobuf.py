"""Just enough Kubernetes protobuf to read what `kubectl create secret|configmap|namespace|
serviceaccount` send: client-go's typed clients post `application/vnd.kubernetes.protobuf`
and, unlike for JSON, do not fall back when the server refuses it. Field numbers are those
of k8s.io/api's generated.proto; other kinds answer 415 (kubectl apply/create -f send JSON).
"""
from __future__ import annotations

import base64
from datetime import datetime, timezone

MAGIC = b"k8s\x00"
STR, BYTES, INT, BOOL, TIME, MAP, MAP_BYTES = "string", "bytes", "int", "bool", "time", "map", "map_bytes"
OWNER_REFERENCE = {1: ("kind", STR), 3: ("name", STR), 4: ("uid", STR), 5: ("apiVersion", STR),
                   6: ("controller", BOOL), 7: ("blockOwnerDeletion", BOOL)}
OBJECT_META = {1: ("name", STR), 2: ("generateName", STR), 3: ("namespace", STR), 5: ("uid", STR),
               6: ("resourceVersion", STR), 7: ("generation", INT), 8: ("creationTimestamp", TIME),
               11: ("labels", MAP), 12: ("annotations", MAP), 13: ("ownerReferences", [OWNER_REFERENCE]),
               14: ("finalizers", [STR])}
KINDS = {
    "Secret": {1: ("metadata", OBJECT_META), 2: ("data", MAP_BYTES), 3: ("type", STR), 4: ("stringData", MAP),
               5: ("immutable", BOOL)},
    "ConfigMap": {1: ("metadata", OBJECT_META), 2: ("data", MAP), 3: ("binaryData", MAP_BYTES), 4: ("immutable", BOOL)},
    "Namespace": {1: ("metadata", OBJECT_META), 2: ("spec", {1: ("finalizers", [STR])})},
    "ServiceAccount": {1: ("metadata", OBJECT_META), 3: ("imagePullSecrets", [{1: ("name", STR)}]),
                       4: ("automountServiceAccountToken", BOOL)},
}


class Unsupported(ValueError):
    """A protobuf body of a kind this module cannot read (the real server could)."""


def decode(body: bytes) -> dict:
    """The JSON form of a protobuf-encoded object; ValueError if it is not one we can read."""
    if not body.startswith(MAGIC):
        raise ValueError("missing the k8s protobuf magic number")
    envelope = _fields(body[len(MAGIC):])  # runtime.Unknown: typeMeta=1, raw=2
    type_meta = _fields(envelope.get(1, [b""])[0])
    api_version, kind = (type_meta.get(n, [b""])[0].decode() for n in (1, 2))
    if kind not in KINDS:
        raise Unsupported(f"the stand-in reads protobuf only for {', '.join(KINDS)}, not {kind or 'this body'}")
    return {"apiVersion": api_version, "kind": kind, **_message(envelope.get(2, [b""])[0], KINDS[kind])}


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        byte = data[i]
        value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
        if not byte & 0x80:
            return value, i


def _fields(data: bytes) -> dict[int, list]:
    """Wire format -> {field number: [raw values in order]} (varints as int, the rest as bytes)."""
    out: dict[int, list] = {}
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i:i + size], i + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, i = data[i:i + width], i + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _message(data: bytes, schema: dict) -> dict:
    fields, out = _fields(data), {}
    for number, values in fields.items():
        if number not in schema:
            continue
        name, kind = schema[number]
        if isinstance(kind, list):
            out[name] = [_value(v, kind[0]) for v in values]
        elif kind in (MAP, MAP_BYTES):
            entries = [_fields(v) for v in values]
            out[name] = {e.get(1, [b""])[0].decode(): _value(e.get(2, [b""])[0], BYTES if kind == MAP_BYTES else STR)
                         for e in entries}
        else:
            out[name] = _value(values[-1], kind)
    # Go's JSON omits empty optional fields; an empty protobuf string means "unset" too.
    return {k: v for k, v in out.items() if v not in ("", None, 0, False) or k in ("data", "stringData")}


def _value(raw, kind):
    if isinstance(kind, dict):
        return _message(raw, kind)
    if kind == STR:
        return raw.decode()
    if kind == BYTES:
        return base64.b64encode(raw).decode()  # JSON carries bytes as base64, as in Secret.data
    if kind in (INT, BOOL):
        return bool(raw) if kind == BOOL else raw
    seconds = _fields(raw).get(1, [0])[0]  # Time: {seconds=1, nanos=2}
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if seconds else None
