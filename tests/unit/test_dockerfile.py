"""The Dockerfile, read as text (no docker): pinned bases, cache-friendly layer order, Kubernetes-friendly CMD."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = "requirements/image.lock"


def _instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = (line.strip() for line in text.splitlines())
    return [(kw.upper(), rest.strip()) for kw, _, rest in
            (line.partition(" ") for line in lines if line and not line.startswith("#"))]


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    return steps[last_from:]


PINNED = re.compile(r"[^\s@]+@sha256:[0-9a-f]{64}")


def test_every_base_is_pinned_by_digest():
    # A FROM names its base either pinned itself or as ${ARG} whose default, declared before the first
    # FROM (the only ARGs a FROM can see), is pinned: the build argument lets a machine without a
    # registry name a local substitute (scripts/image-base.sh), while every other build takes the digest.
    steps = _instructions()
    first_from = next(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    defaults = {name: value.strip("\"'") for kw, args in steps[:first_from] if kw == "ARG"
                for name, _, value in [args.partition("=")]}
    froms = [[w for w in args.split() if not w.startswith("--")] for kw, args in steps if kw == "FROM"]
    assert len(froms) >= 2  # builder + slim final stage
    stages: set[str] = set()
    resolved = []
    for base, *alias in froms:
        if base in stages:
            continue  # FROM an earlier stage: its base was checked there
        stages.update(alias[1:])  # `AS name`
        arg = re.fullmatch(r"\$\{?(\w+)\}?", base)
        if arg:
            assert arg[1] in defaults, f"FROM {base}: no ARG {arg[1]} before the first FROM"
            base = defaults[arg[1]]
        assert PINNED.fullmatch(base), f"FROM {base}: not pinned by digest"
        resolved.append(base)
    # The venv built in the builder stage links to the base's python: both stages must share one base.
    assert len(set(resolved)) == 1, resolved


def test_final_stage_has_no_entrypoint_and_an_exec_form_cmd():
    final = _final_stage()
    assert not [args for kw, args in final if kw == "ENTRYPOINT"]
    cmds = [args for kw, args in final if kw == "CMD"]
    assert len(cmds) == 1 and isinstance(json.loads(cmds[0]), list)
    assert ("WORKDIR", "/app") in final


def test_locked_dependencies_are_installed_before_the_code_is_copied():
    steps = _instructions()
    copy_lock = next(i for i, (kw, args) in enumerate(steps) if kw == "COPY" and LOCK in args)
    install = next(i for i, (kw, args) in enumerate(steps)
                   if kw == "RUN" and "pip install" in args and "--require-hashes" in args)
    code = [i for i, (kw, args) in enumerate(steps)
            if kw == "COPY" and re.search(r"(^|\s)(pipeline|flows)/", args)]
    assert code and copy_lock < install < min(code)


def test_runs_as_a_numeric_non_root_user():
    users = [args for kw, args in _final_stage() if kw == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users


def test_lock_pins_the_cuda_torch_and_is_in_the_build_context():
    lock = (ROOT / LOCK).read_text()
    assert re.search(r"^torch==2\.13\.0 ", lock, re.M)
    assert "--hash=sha256:" in lock
    assert f"!{LOCK}" in (ROOT / ".dockerignore").read_text().splitlines()
