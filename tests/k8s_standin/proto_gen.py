"""Regenerate proto_k8s.json, the protobuf field table that protobuf.py decodes with.

Everything in the table is read mechanically out of the official sources of one release:
k8s.io/api and k8s.io/apimachinery at the tag matching schema.SCHEMA_VERSION (v0.32.0 for
Kubernetes 1.32). generated.proto gives each message's field numbers and protobuf types;
types.go gives what protobuf does not say and the JSON form needs: each field's JSON name,
whether it is inlined (`json:",inline"`, such as Volume's VolumeSource) and whether it is a Go
pointer (a pointer that is set stays in the JSON even when it holds 0, false or "").

Only the messages reachable from the kinds the stand-in serves (resources.KINDS) are kept.
When a kind is added there, rerun it on the two source trees at that tag (the Go module
cache holds them after `go mod download -json k8s.io/api@v0.32.0 k8s.io/apimachinery@v0.32.0`,
which prints each one's Dir; a git checkout of either tag has the same layout):

    python -m tests.k8s_standin.proto_gen API_DIR APIMACHINERY_DIR
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tests.k8s_standin import resources, schema

OUT = Path(__file__).with_name("proto_k8s.json")
SCALARS = {"string", "bytes", "bool", "int32", "int64"}
# Messages whose JSON form is not their fields (custom MarshalJSON in apimachinery).
SPECIAL = {"meta.v1.Time": "time", "meta.v1.MicroTime": "microtime", "meta.v1.Duration": "duration",
           "meta.v1.FieldsV1": "json", "runtime.RawExtension": "json", "intstr.IntOrString": "intorstring",
           "resource.Quantity": "quantity"}
FIELD = re.compile(r"^\s*(optional|repeated|required)?\s*(map<\s*([\w.]+)\s*,\s*([\w.]+)\s*>|[\w.]+)"
                   r"\s+(\w+)\s*=\s*(\d+)\s*;")
GO_FIELD = re.compile(r"^\s*(?:(\w+)\s+)?([^\s`]+)\s+`([^`]*)`")


def short(full: str) -> str:
    """k8s.io.api.core.v1.Pod -> core.v1.Pod; k8s.io.apimachinery.pkg.apis.meta.v1.Time -> meta.v1.Time."""
    for prefix in ("k8s.io.api.", "k8s.io.apimachinery.pkg.apis.", "k8s.io.apimachinery.pkg.util.",
                   "k8s.io.apimachinery.pkg.api.", "k8s.io.apimachinery.pkg."):
        if full.startswith(prefix):
            return full[len(prefix):]
    raise ValueError(f"unexpected protobuf package of {full}")


def read_protos(api: Path, machinery: Path) -> tuple[dict, dict]:
    """{message: {number: (proto name, type, repeated)}} and {message: Go package directory}."""
    messages, dirs = {}, {}
    for path in sorted([*api.glob("*/*/generated.proto"), *machinery.glob("pkg/**/generated.proto")]):
        text = path.read_text()
        package = re.search(r"^package ([\w.]+);", text, re.M)[1]
        current = None
        for line in text.splitlines():
            if m := re.match(r"^message (\w+) \{", line):
                current = short(f"{package}.{m[1]}")
                messages[current], dirs[current] = {}, path.parent
            elif line.startswith("}"):
                current = None
            elif current and (m := FIELD.match(line)):
                resolve = (lambda t: t if t in SCALARS else short(t[1:]) if t.startswith(".")
                           else short(f"{package}.{t}"))
                kind = ["map", resolve(m[3]), resolve(m[4])] if m[3] else resolve(m[2])
                messages[current][int(m[6])] = (m[5], kind, m[1] == "repeated")
    return messages, dirs


def read_go_structs(directory: Path) -> dict:
    """{struct: {protobuf number: (json name, pointer, inline)}} from a Go package's sources."""
    structs = {}
    for path in sorted(directory.glob("*.go")):
        if path.name.endswith("_test.go") or path.name.startswith(("zz_generated", "generated.pb")):
            continue
        current = None
        for line in path.read_text().splitlines():
            if m := re.match(r"^type (\w+) struct \{", line):
                current = structs.setdefault(m[1], {})
            elif line.startswith("}"):
                current = None
            elif current is not None and (m := GO_FIELD.match(line)) and 'protobuf:"' in m[3]:
                tags = dict(re.findall(r'(\w+):"([^"]*)"', m[3]))
                if tags["protobuf"] == "-":
                    continue
                number = int(tags["protobuf"].split(",")[1])
                json_name, *options = tags.get("json", "").split(",")
                current[number] = (json_name, m[2].startswith("*"), "inline" in options and not json_name)
    return structs


def root(kind: resources.Kind) -> str:
    package = kind.group.split(".")[0] if kind.group else "core"
    return f"{package}.{kind.version}.{kind.kind}"


def build(api: Path, machinery: Path) -> dict:
    protos, dirs = read_protos(api, machinery)
    go = {}
    kinds = {f"{k.api_version}/{k.kind}": root(k) for k in resources.KINDS}
    table, todo = {}, list(kinds.values())
    while todo:
        name = todo.pop()
        if name in table or name in SPECIAL:
            continue
        package_dir = dirs[name]
        if package_dir not in go:
            go[package_dir] = read_go_structs(package_dir)
        struct = go[package_dir].get(name.rsplit(".", 1)[1])
        if struct is None:
            raise SystemExit(f"{name}: no Go struct (a non-struct message needs a SPECIAL entry)")
        fields = {}
        for number, (proto_name, kind, repeated) in sorted(protos[name].items()):
            if number not in struct:
                raise SystemExit(f"{name}.{proto_name} = {number}: no Go field has this protobuf tag")
            json_name, pointer, inline = struct[number]
            flags = "r" * repeated + "p" * pointer + "i" * inline
            fields[str(number)] = [json_name, kind, flags]
            for ref in (kind[1:] if isinstance(kind, list) else [kind]):
                if ref not in SCALARS:
                    todo.append(ref)
        table[name] = fields
    return {"source": f"k8s.io/api and k8s.io/apimachinery v0.{schema.SCHEMA_VERSION.split('.')[1]}."
                      f"{schema.SCHEMA_VERSION.split('.')[2]}: generated.proto and types.go (proto_gen.py)",
            "kinds": kinds, "special": SPECIAL, "messages": dict(sorted(table.items()))}


def main(argv: list[str]) -> None:
    api, machinery = (Path(a) for a in argv)
    out = build(api, machinery)
    lines = [f"{json.dumps(name)}: {json.dumps(fields, separators=(',', ':'))}"
             for name, fields in out["messages"].items()]  # one message a line: diffs stay readable
    head = {k: v for k, v in out.items() if k != "messages"}
    OUT.write_text(json.dumps(head, indent=1)[:-2] + ',\n "messages": {\n' + ",\n".join(lines) + "\n}}\n")
    print(f"{OUT}: {len(out['messages'])} messages for {len(out['kinds'])} kinds")


if __name__ == "__main__":
    main(sys.argv[1:])
