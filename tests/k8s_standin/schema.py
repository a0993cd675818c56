"""Decoding and schema checks, sorted the way the API server's own stages sort them.

The official 1.32 schemas (kubernetes-validate) find three kinds of problem, which the real
server reports at three different places:
- wrong JSON types: the body cannot be decoded into the Go type -> 400 BadRequest;
- unknown fields: decoding drops them; `fieldValidation=Strict` (kubectl's default) makes
  that a 400, the default (`Warn`, what the Python client gets) a `Warning: 299` header;
- missing required fields, values outside an enum: validation -> 422 Invalid.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache

import importlib_resources
import jsonschema
from referencing import Registry, Resource

SCHEMA_VERSION = "1.32.0"
GO_TYPES = {"integer": "int32", "string": "string", "boolean": "bool", "object": "struct", "array": "slice",
            "number": "float64"}


@dataclass
class Problems:
    decode: list[str] = field(default_factory=list)  # 400
    unknown: list[tuple[tuple, str]] = field(default_factory=list)  # (path parts, printable path)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # 422 (field, message)


@lru_cache(maxsize=None)
def _validator(kind: str, api_version: str):
    base = importlib_resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{SCHEMA_VERSION}-local-strict")
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # rbac.authorization.k8s.io/v1 -> rbac-v1
    path = base.joinpath(f"{kind.lower()}-{group_version}.json")
    schema = json.loads(path.read_text())
    definitions = Resource.from_contents(json.loads(base.joinpath("_definitions.json").read_text()))
    registry = Resource.from_contents(schema) @ (definitions @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def field_path(parts) -> str:
    """spec.template.spec.containers[0].name: the server's notation."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool", type(None): "null"}.get(type(value), "number")


def check(obj: dict) -> Problems:
    problems = Problems()
    for err in sorted(_validator(obj["kind"], obj["apiVersion"]).iter_errors(obj), key=lambda e: list(e.absolute_path)):
        parts = tuple(err.absolute_path)
        where = field_path(parts)
        if err.validator in ("type", "oneOf", "anyOf"):
            wanted = err.validator_value if err.validator == "type" else "string or number"
            wanted = [t for t in wanted if t != "null"][0] if isinstance(wanted, list) else wanted
            go_path = ".".join(str(p) for p in parts if not isinstance(p, int))  # Go's notation has no indexes
            problems.decode.append(f"json: cannot unmarshal {_json_type(err.instance)} into Go struct field "
                                   f"{obj['kind']}.{go_path} of type {GO_TYPES.get(wanted, wanted)}")
        elif err.validator == "additionalProperties":
            known, patterns = err.schema.get("properties") or {}, err.schema.get("patternProperties") or {}
            for key in err.instance:
                if key not in known and not any(re.search(p, key) for p in patterns):
                    problems.unknown.append((parts + (key,), field_path(parts + (key,))))
        elif err.validator == "required":
            for key in err.validator_value:
                if key not in err.instance:
                    problems.invalid.append((field_path(parts + (key,)), "Required value"))
        elif err.validator == "enum":
            allowed = ", ".join(f'"{v}"' for v in err.validator_value if v is not None)
            problems.invalid.append((where, f"Unsupported value: {json.dumps(err.instance)}: "
                                            f"supported values: {allowed}"))
        else:
            problems.invalid.append((where, f"Invalid value: {json.dumps(err.instance)}: {err.message}"))
    return problems


def drop(obj: dict, paths: list[tuple]) -> None:
    """Remove unknown fields, as decoding into the Go type does."""
    for parts in paths:
        node = obj
        for part in parts[:-1]:
            node = node[part]
        node.pop(parts[-1], None)
