"""Params files and `--set` overrides -> a validated Config, or a ConfigError listing every problem at once.

The schema is pipeline/config.py; this module reads, overlays and writes the YAML it validates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config import DEFAULT_PARAMS, Config
from pipeline.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value); the value is read as YAML (`all`, `3e-4`, `[a, b]`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML ({exc.problem})") from exc
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    problems: list[str] = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{'.'.join(path)}: {part} is a value, not a section")
                break
            node = child
        else:
            node[path[-1]] = value
    if problems:
        raise ConfigError(problems)
    return raw


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"] if not str(p).startswith(("function-", "literal[")))
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    shown = error.get("input")
    got = "" if isinstance(shown, dict) else f" (got {shown!r})"
    return f"{key or '<root>'}: {error['msg']}{got}"


def build_config(raw: dict[str, Any] | None) -> Config:
    try:
        return Config.model_validate(raw or {})
    except ValidationError as exc:
        # One line per problem, deduplicated (union types report each branch).
        lines = list(dict.fromkeys(_describe(e) for e in exc.errors()))
        raise ConfigError(lines) from None


def read_params(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    """A params file: a local path, or a URI (s3://...: the file a flow writes once for its stage pods)."""
    if "://" in str(path):
        from pipeline import storage

        if not storage.exists(str(path)):
            raise ConfigError(f"{path}: params file not found")
        text = storage.read_bytes(str(path)).decode()
    else:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: params file not found")
        text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def write_params(target: Path | str, raw: dict[str, Any]) -> None:
    """Write a params mapping as YAML to a local path or a URI (the file a flow writes once for its stage pods)."""
    text = yaml.safe_dump(raw, sort_keys=False)
    if "://" in str(target):
        from pipeline import storage

        storage.write_bytes(str(target), text.encode())
    else:
        Path(target).write_text(text)


def update_params_file(path: Path | str, overrides: list[str]) -> Config:
    """Apply dotted overrides to a params file in place (validated first: a bad one leaves it as it was)."""
    raw = apply_overrides(read_params(path), overrides)
    cfg = build_config(raw)
    write_params(path, raw)
    return cfg


def load_config(params: Path | str | None = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Config:
    """params.yaml (if given) + dotted overrides -> validated Config, or ConfigError listing every problem."""
    raw = read_params(params) if params is not None else {}
    return build_config(apply_overrides(raw, overrides or []))
