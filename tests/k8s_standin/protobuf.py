"""Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`), read into their JSON form.

kubectl's typed clients (`kubectl create job|deployment|service|role|rolebinding|secret|...`)
post protobuf for built-in kinds and, unlike for JSON, do not fall back when the server
answers 415. So every kind the stand-in serves is read here, with the field table proto_k8s.json,
which proto_gen.py derives from the official generated.proto and types.go of the release the
stand-in validates against (k8s.io/api v0.32.0). The result is what the real server's decoding
into the Go type and back to JSON gives: field names are the JSON names, an inlined struct's
fields sit in its parent, `bytes` are base64, IntOrString is a number or a string, Quantity and
Time are strings. A zero value that Go keeps only behind a pointer (`backoffLimit: 0`,
`automountServiceAccountToken: false`, `emptyDir: {}`) stays; other zero values are left out,
as `omitempty` leaves them out. Unknown field numbers are skipped, as the Go decoder skips
them; a wrong wire type or a truncated body is an error (400).
"""
from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

MAGIC = b"k8s\x00"
TABLE = Path(__file__).with_name("proto_k8s.json")
VARINT, I64, LEN, I32 = 0, 1, 2, 5
WIRE = {"string": LEN, "bytes": LEN, "bool": VARINT, "int32": VARINT, "int64": VARINT}


class Unsupported(ValueError):
    """A protobuf body of a kind this module has no table for (the real server could read it)."""


@lru_cache(maxsize=None)
def table() -> dict:
    return json.loads(TABLE.read_text())


def kinds() -> list[str]:
    """`<apiVersion>/<kind>` of every kind that can be read."""
    return list(table()["kinds"])


def decode(body: bytes) -> dict:
    """The JSON form of a protobuf-encoded object; ValueError if it is not one."""
    if not body.startswith(MAGIC):
        raise ValueError("missing the k8s protobuf magic number")
    envelope = _fields(body[len(MAGIC):])  # runtime.Unknown: typeMeta=1, raw=2, contentEncoding=3, contentType=4
    type_meta = _fields(_last(envelope, 1, LEN, b""))
    api_version, kind = (_last(type_meta, n, LEN, b"").decode(errors="replace") for n in (1, 2))
    if _last(envelope, 3, LEN, b""):
        raise ValueError(f"unsupported content encoding {_last(envelope, 3, LEN, b'').decode(errors='replace')!r}")
    message = table()["kinds"].get(f"{api_version}/{kind}")
    if message is None:
        raise Unsupported(f"the stand-in reads protobuf only for {', '.join(kinds())}, not "
                          f"{api_version + '/' + kind if kind else 'this body'}")
    return {"apiVersion": api_version, "kind": kind, **_message(_last(envelope, 2, LEN, b""), message)}


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("proto: unexpected EOF in a varint")
        if shift >= 64:
            raise ValueError("proto: integer overflow")
        byte = data[i]
        value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
        if not byte & 0x80:
            return value, i


def _fields(data: bytes) -> dict[int, list[tuple[int, int | bytes]]]:
    """Wire format -> {field number: [(wire type, raw value) in order]}."""
    out: dict[int, list] = {}
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("proto: illegal tag 0")
        if wire == VARINT:
            value, i = _varint(data, i)
        elif wire == LEN:
            size, i = _varint(data, i)
            if i + size > len(data):
                raise ValueError("proto: unexpected EOF in a length-delimited field")
            value, i = data[i:i + size], i + size
        elif wire in (I64, I32):
            width = 8 if wire == I64 else 4
            if i + width > len(data):
                raise ValueError("proto: unexpected EOF in a fixed-width field")
            value, i = data[i:i + width], i + width
        else:
            raise ValueError(f"proto: illegal wire type {wire}")
        out.setdefault(number, []).append((wire, value))
    return out


def _last(fields: dict, number: int, wire: int, default):
    values = fields.get(number)
    if not values:
        return default
    if values[-1][0] != wire:
        raise ValueError(f"proto: wrong wireType = {values[-1][0]} for field {number}")
    return values[-1][1]


def _zero(value) -> bool:
    return value in ("", 0, False, None) or value == {} or value == []


def _message(data: bytes, name: str) -> dict | str | int | None:
    special = table()["special"].get(name)
    if special:
        return _special(data, special)
    schema, out = table()["messages"][name], {}
    for number, values in _fields(data).items():
        entry = schema.get(str(number))
        if entry is None:  # a field this release does not know: the Go decoder skips it too
            continue
        json_name, kind, flags = entry
        try:
            if isinstance(kind, list):  # map<K, V>: repeated {key = 1, value = 2} entries
                value = {}
                for wire, raw in values:
                    _expect(wire, LEN, json_name)
                    item = _fields(raw)
                    value[_scalar(_last(item, 1, WIRE[kind[1]], b""), kind[1])] = _decode(item.get(2), kind[2])
            elif "r" in flags:
                value = [v for wire, raw in values for v in _repeated(wire, raw, kind, json_name)]
            elif kind in WIRE:
                _expect(values[-1][0], WIRE[kind], json_name)
                value = _scalar(values[-1][1], kind)
            else:  # a message seen twice is merged, as protobuf merges it
                for wire, _ in values:
                    _expect(wire, LEN, json_name)
                value = _message(b"".join(raw for _, raw in values), kind)
        except ValueError as err:
            raise ValueError(f"{json_name or kind}: {err}") from None
        if "i" in flags:
            out.update(value)
        elif value is not None and ("p" in flags or not _zero(value)):
            out[json_name] = value
    return out


def _expect(wire: int, wanted: int, name: str) -> None:
    if wire != wanted:
        raise ValueError(f"proto: wrong wireType = {wire} for field {name}")


def _repeated(wire: int, raw, kind: str, name: str) -> list:
    if kind in WIRE and WIRE[kind] == VARINT and wire == LEN:  # packed
        out, i = [], 0
        while i < len(raw):
            value, i = _varint(raw, i)
            out.append(_scalar(value, kind))
        return out
    _expect(wire, WIRE.get(kind, LEN), name)
    return [_scalar(raw, kind) if kind in WIRE else _message(raw, kind)]


def _decode(values: list | None, kind: str):
    """A map value: a scalar or a message (absent: its zero value)."""
    if kind in WIRE:
        if not values:
            return {"string": "", "bytes": "", "bool": False}.get(kind, 0)
        _expect(values[-1][0], WIRE[kind], "value")
        return _scalar(values[-1][1], kind)
    for wire, _ in values or []:
        _expect(wire, LEN, "value")
    return _message(b"".join(raw for _, raw in values or []), kind)


def _scalar(raw, kind: str):
    if kind == "string":
        return raw.decode(errors="replace")  # Go's JSON encoder replaces invalid UTF-8 the same way
    if kind == "bytes":
        return base64.b64encode(raw).decode()  # JSON carries []byte as base64, as in Secret.data
    if kind == "bool":
        return bool(raw)
    if kind == "int32":
        raw &= 0xFFFFFFFF  # negative int32s come sign-extended to 64 bits
        return raw - (1 << 32) if raw >= 1 << 31 else raw
    return raw - (1 << 64) if raw >= 1 << 63 else raw  # int64


def _special(data: bytes, special: str):
    fields = _fields(data)
    if special in ("time", "microtime"):  # {seconds = 1, nanos = 2}; the zero Time is JSON null
        seconds, nanos = (_scalar(_last(fields, n, VARINT, 0), "int64") for n in (1, 2))
        if not seconds and not nanos:
            return None
        when = datetime.fromtimestamp(seconds, timezone.utc)
        if special == "time":
            return when.strftime("%Y-%m-%dT%H:%M:%SZ")
        return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{nanos // 1000:06d}Z"
    if special == "duration":  # {duration = 1} in nanoseconds, as Go's time.Duration.String()
        return _go_duration(_scalar(_last(fields, 1, VARINT, 0), "int64"))
    if special == "quantity":  # {string = 1}
        return _last(fields, 1, LEN, b"").decode(errors="replace")
    if special == "intorstring":  # {type = 1 (0 int, 1 string), intVal = 2, strVal = 3}
        if _last(fields, 1, VARINT, 0) == 1:
            return _last(fields, 3, LEN, b"").decode(errors="replace")
        return _scalar(_last(fields, 2, VARINT, 0), "int32")
    raw = _last(fields, 1, LEN, b"")  # RawExtension {raw = 1}, FieldsV1 {Raw = 1}: JSON bytes
    return json.loads(raw) if raw else None


def _go_duration(nanos: int) -> str:
    if nanos == 0:
        return "0s"
    sign, nanos = ("-" if nanos < 0 else ""), abs(nanos)
    def decimal(value: int, size: int, digits: int) -> str:
        whole, fraction = divmod(value, size)
        return f"{whole}.{fraction:0{digits}d}".rstrip("0").rstrip(".")
    if nanos < 1_000_000_000:
        for unit, size, digits in (("ms", 1_000_000, 6), ("µs", 1_000, 3), ("ns", 1, 0)):
            if nanos >= size:
                return sign + (decimal(nanos, size, digits) if digits else str(nanos)) + unit
    hours, rest = divmod(nanos, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    seconds = decimal(rest, 1_000_000_000, 9) + "s"
    return sign + (f"{hours}h{minutes}m" if hours else f"{minutes}m" if minutes else "") + seconds
