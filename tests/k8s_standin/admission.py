"""What happens to a written object before it is stored: decoding, field validation, validation.

The stages and their answers are the real server's: a body that cannot be decoded (malformed,
wrong JSON types, an unknown field under `fieldValidation=Strict`) is a 400 BadRequest; an
unreadable media type a 415; a decoded object that breaks a rule a 422 naming every field.
Otherwise unknown fields are dropped, with one `Warning: 299` header each (`Warn`, the default;
`Ignore` drops them silently).
"""
from __future__ import annotations

import json

import yaml

from tests.k8s_standin import protobuf, schema
from tests.k8s_standin.resources import Kind
from tests.k8s_standin.rules import api_rules
from tests.k8s_standin.store import ApiError

REASONS = {"Required value": "FieldValueRequired", "Unsupported value": "FieldValueNotSupported",
           "Duplicate value": "FieldValueDuplicate", "Too many": "FieldValueTooMany",
           "Forbidden": "FieldValueForbidden"}
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")


def invalid(kind: Kind, name: str, problems: list[tuple[str, str]]) -> ApiError:
    """errors.NewInvalid: one cause per field error, message `<Kind.group> "<name>" is invalid: ...`."""
    causes = [{"reason": next((r for p, r in REASONS.items() if msg.startswith(p)), "FieldValueInvalid"),
               "message": msg, "field": f} for f, msg in problems]
    text = [f"{f}: {msg}" for f, msg in problems]
    qualified = f"{kind.kind}.{kind.group}" if kind.group else kind.kind
    return ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: '
                                    + (text[0] if len(text) == 1 else "[" + ", ".join(text) + "]"),
                    {"name": name, "group": kind.group, "kind": kind.kind, "causes": causes})


def decode(body: bytes, content_type: str | None, kind: Kind) -> dict:
    """The request body as an object of `kind` (JSON, YAML or protobuf), or the server's 400/415."""
    ctype = (content_type or "application/json").split(";")[0].strip().lower()
    unrecognized = f"the object provided is unrecognized (must be of type {kind.kind})"
    cannot = f'{kind.kind} in version "{kind.version}" cannot be handled as a {kind.kind}'
    try:
        if ctype in YAML_TYPES:
            obj = yaml.safe_load(body.decode())
        elif ctype == "application/json":
            obj = json.loads(body or b"null")
        elif ctype == "application/vnd.kubernetes.protobuf":
            obj = protobuf.decode(body)
        else:
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                           "accepted media types include: application/json, application/yaml, "
                           "application/vnd.kubernetes.protobuf")
    except protobuf.Unsupported as err:
        raise ApiError(415, "UnsupportedMediaType", str(err)) from None
    except (ValueError, yaml.YAMLError) as err:
        summary = body[:30].decode(errors="replace") + (" ..." if len(body) > 30 else "")
        raise ApiError(400, "BadRequest", f"{unrecognized}: couldn't get version/kind; json parse error: "
                                          f"{str(err).splitlines()[0]} ({summary})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "BadRequest", f"{unrecognized}: couldn't get version/kind; json parse error: "
                                          f"cannot unmarshal {type(obj).__name__} into an object")
    # The endpoint supplies a missing apiVersion/kind, as the server's decoder defaults them.
    obj["apiVersion"] = obj.get("apiVersion") or kind.api_version
    obj["kind"] = obj.get("kind") or kind.kind
    if obj["apiVersion"] != kind.api_version:
        raise ApiError(400, "BadRequest", f"the API version in the data ({obj['apiVersion']}) does not match "
                                          f"the expected API version ({kind.api_version})")
    if obj["kind"] != kind.kind:
        raise ApiError(400, "BadRequest", f'{obj["kind"]} in version "{kind.version}" cannot be handled as a '
                                          f'{kind.kind}: no kind "{obj["kind"]}" is registered for this endpoint')
    if not isinstance(obj.setdefault("metadata", {}), dict):
        raise ApiError(400, "BadRequest", f"{cannot}: json: cannot unmarshal into Go struct field "
                                          f"{kind.kind}.metadata of type v1.ObjectMeta")
    return obj


def validate(obj: dict, kind: Kind, field_validation: str | None) -> list[str]:
    """Field validation, then validation: returns the warnings to send; raises the 400 or 422."""
    problems = schema.check(obj)
    cannot = f'{kind.kind} in version "{kind.version}" cannot be handled as a {kind.kind}'
    if problems.decode:
        raise ApiError(400, "BadRequest", f"{cannot}: {problems.decode[0]}")
    warnings = []
    if problems.unknown:
        unknown = [f'unknown field "{printable}"' for _, printable in problems.unknown]
        if field_validation == "Strict":
            raise ApiError(400, "BadRequest", f"{cannot}: strict decoding error: {', '.join(unknown)}")
        schema.drop(obj, [parts for parts, _ in problems.unknown])
        warnings = unknown if field_validation != "Ignore" else []
    found = problems.invalid + api_rules(obj)
    if found:
        raise invalid(kind, obj["metadata"].get("name") or "", found)
    return warnings
