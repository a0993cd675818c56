"""The container image as the kubelet sees it: this checkout, described by the Dockerfile.

Only the final stage's runtime config matters to a pod: ENTRYPOINT, CMD, ENV, WORKDIR (and
SHELL for shell-form commands). Everything that builds files (RUN, COPY, USER...) is
skipped: the stand-in runs this checkout's files with this interpreter instead. An
external base image's own config is unknown here, so a stage `FROM <image>` starts from
Docker's default PATH and nothing else (a stage `FROM <earlier stage>` inherits it).
"""
from __future__ import annotations

import copy
import json
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Docker's default
HEREDOC = re.compile(r"<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_]*)\2")


@dataclass
class ImageConfig:
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    workdir: str = "/"
    shell: list[str] = field(default_factory=lambda: ["/bin/sh", "-c"])


def container_argv(image: ImageConfig, command: list[str] | None, args: list[str] | None) -> list[str]:
    """The process a container runs, by the Kubernetes rule (as containerd applies it):
    `command` replaces ENTRYPOINT and drops CMD; `args` replaces CMD; an empty list counts as unset."""
    if command:
        argv = list(command) + list(args or [])
    else:
        argv = list(image.entrypoint) + (list(args) if args else list(image.cmd))
    if not argv:
        raise ValueError("no command specified")
    return argv


def load(path: Path) -> ImageConfig:
    return parse_dockerfile(Path(path).read_text()) if Path(path).exists() else ImageConfig()


def parse_dockerfile(text: str) -> ImageConfig:
    stages: dict[str, ImageConfig] = {}
    global_args: dict[str, str] = {}
    image: ImageConfig | None = None
    stage_args: dict[str, str] = {}
    cmd_set = False  # an ENTRYPOINT resets a CMD inherited from the base, not one set in this stage
    for op, rest in instructions(text):
        scope = {**stage_args, **(image.env if image else {})}
        if op == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = expand(words[0], global_args).lower() if words else ""
            image = copy.deepcopy(stages[base]) if base in stages else ImageConfig()
            stage_args, cmd_set = {}, False
            if len(words) >= 3 and words[1].lower() == "as":
                stages[words[2].lower()] = image  # same object: later instructions shape it
        elif op == "ARG":
            for word in split_words(rest):
                name, eq, value = word.partition("=")
                target = stage_args if image else global_args
                target[name] = process_word(value, scope) if eq else global_args.get(name, "")
        elif image is None:
            continue  # only ARG may come before the first FROM
        elif op == "ENV":
            image.env.update(parse_env(rest, scope))  # all values expand against the previous env
        elif op == "WORKDIR":
            image.workdir = posixpath.normpath(posixpath.join(image.workdir, process_word(rest.strip(), scope)))
        elif op == "SHELL":
            image.shell = json.loads(rest)
        elif op in ("ENTRYPOINT", "CMD"):
            argv = _exec_form(rest)
            argv = argv if argv is not None else image.shell + [rest.strip()]
            if op == "CMD":
                image.cmd, cmd_set = argv, True
            else:
                image.entrypoint = argv
                image.cmd = image.cmd if cmd_set else []
    return image or ImageConfig()


def instructions(text: str):
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments and heredoc bodies dropped."""
    lines = text.splitlines()
    escape = "\\"
    for line in lines:  # parser directives come first, before any instruction or blank line
        match = re.fullmatch(r"#\s*escape\s*=\s*(\S)\s*", line)
        if match:
            escape = match[1]
        if not line.startswith("#"):
            break
    i = 0
    while i < len(lines):
        line, i = lines[i], i + 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = []
        while True:
            stripped = line.rstrip()
            if stripped.endswith(escape) and i < len(lines):
                parts.append(stripped[:-1])
                line, i = lines[i], i + 1
                while i < len(lines) and (not line.strip() or line.lstrip().startswith("#")):
                    line, i = lines[i], i + 1  # comments and blank lines inside a continuation vanish
                continue
            parts.append(line)
            break
        op, _, rest = " ".join(parts).strip().partition(" ")
        op = op.upper()
        if op in ("RUN", "COPY", "ADD"):
            for dash, _, word in HEREDOC.findall(rest):
                while i < len(lines) and (lines[i].lstrip("\t") if dash else lines[i]) != word:
                    i += 1
                i += 1
        yield op, rest.strip()


def _exec_form(rest: str) -> list[str] | None:
    if not rest.strip().startswith("["):
        return None
    try:
        value = json.loads(rest)
    except ValueError:
        return None  # not valid JSON: Docker runs it in the shell form
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def parse_env(rest: str, scope: dict[str, str]) -> dict[str, str]:
    words = split_words(rest)
    if words and "=" not in words[0]:  # legacy `ENV KEY value with spaces`
        key, _, value = rest.strip().partition(" ")
        return {key: process_word(value.strip(), scope)}
    out = {}
    for word in words:
        key, _, value = word.partition("=")
        out[key] = process_word(value, scope)
    return out


def split_words(text: str) -> list[str]:
    """Split on unquoted whitespace; quotes and escapes stay for process_word."""
    words, cur, quote, i = [], "", None, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quote != "'" and i + 1 < len(text):
            cur, i = cur + text[i:i + 2], i + 2
            continue
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch.isspace():
            if cur:
                words.append(cur)
            cur, i = "", i + 1
            continue
        cur, i = cur + ch, i + 1
    return words + ([cur] if cur else [])


def process_word(word: str, scope: dict[str, str]) -> str:
    """Remove quotes, apply backslash escapes, expand $VAR/${VAR...} (not inside single quotes)."""
    out, quote, i = "", None, 0
    while i < len(word):
        ch = word[i]
        if quote == "'":
            if ch == "'":
                quote = None
            else:
                out += ch
            i += 1
        elif ch == "\\" and i + 1 < len(word) and (quote is None or word[i + 1] in '"\\$'):
            out, i = out + word[i + 1], i + 2
        elif ch in "'\"" and quote is None:
            quote, i = ch, i + 1
        elif ch == '"' and quote == '"':
            quote, i = None, i + 1
        elif ch == "$":
            value, i = _variable(word, i, scope)
            out += value
        else:
            out, i = out + ch, i + 1
    return out


def expand(text: str, scope: dict[str, str]) -> str:
    out, i = "", 0
    while i < len(text):
        if text[i] == "$":
            value, i = _variable(text, i, scope)
            out += value
        else:
            out, i = out + text[i], i + 1
    return out


def _variable(text: str, i: int, scope: dict[str, str]) -> tuple[str, int]:
    """Expand the reference at text[i] == '$': $NAME, ${NAME}, ${NAME:-word}, ${NAME:+word} (and - / +)."""
    if text.startswith("${", i):
        end = text.find("}", i)
        if end < 0:
            return text[i:], len(text)
        body = text[i + 2:end]
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+?])(.*))?", body, re.S)
        if not match:
            return text[i:end + 1], end + 1
        name, op, word = match[1], match[2], match[3] or ""
        value, present = scope.get(name), name in scope
        if op in (":-", "-"):
            use_default = not value if op == ":-" else not present
            return (expand(word, scope) if use_default else value), end + 1
        if op in (":+", "+"):
            use_alt = bool(value) if op == ":+" else present
            return (expand(word, scope) if use_alt else ""), end + 1
        return value or "", end + 1
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i + 1:])
    if not match:
        return "$", i + 1
    return scope.get(match[0], ""), i + 1 + len(match[0])
