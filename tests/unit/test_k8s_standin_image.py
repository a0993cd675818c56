"""The stand-in's container semantics: Dockerfile final stage, the Kubernetes argv rule, and
the environment as the kubelet builds it (no host variables)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.k8s_standin.image import DEFAULT_PATH, ImageConfig, container_argv, parse_dockerfile
from tests.k8s_standin.kubelet import ConfigError, PathMap, container_env, expand, image_paths

REPO_ROOT = Path(__file__).resolve().parents[2]

MULTI_STAGE = r"""
# syntax=docker/dockerfile:1
ARG PYTHON=3.11
FROM python:${PYTHON}-slim AS build
ENV VIRTUAL_ENV=/opt/venv
RUN python -m venv $VIRTUAL_ENV
ENTRYPOINT ["python", "-m", "build-only"]
COPY <<EOF /etc/motd
ENV NOT_AN_INSTRUCTION=1
EOF

FROM python:${PYTHON}-slim
ARG PYTHON
# The final stage: no ENTRYPOINT, `pipeline --help` by default.
COPY --from=build /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    # comments inside a continuation vanish
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp PY_VERSION=${PYTHON}
WORKDIR /app
USER 10001:10001
CMD ["pipeline", "--help"]
"""


def test_final_stage_of_a_multi_stage_dockerfile():
    image = parse_dockerfile(MULTI_STAGE)
    assert image.entrypoint == []  # the build stage's ENTRYPOINT is not inherited by a fresh FROM
    assert image.cmd == ["pipeline", "--help"]
    assert image.workdir == "/app"
    assert image.env == {"PATH": f"/opt/venv/bin:{DEFAULT_PATH}", "VIRTUAL_ENV": "/opt/venv", "PYTHONUNBUFFERED": "1",
                         "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp", "PY_VERSION": "3.11"}


def test_env_forms_quotes_and_expansion():
    image = parse_dockerfile("""FROM scratch AS base
ENV A=1
ENV B="two words" C='$A literal' D=${A}x E=${UNSET:-fallback} F=${A:+set}
ENV LEGACY value with  spaces
ENV A=2 G=$A
WORKDIR /srv
WORKDIR sub/../app
FROM base
CMD python -m pipeline
""")
    env = image.env
    assert [env[k] for k in "ABCDEF"] == ["2", "two words", "$A literal", "1x", "fallback", "set"]
    assert env["LEGACY"] == "value with  spaces"
    assert env["G"] == "1"  # one ENV instruction expands against the values from before it
    assert image.workdir == "/srv/app"  # inherited from the stage it builds on; relative WORKDIRs join
    assert image.cmd == ["/bin/sh", "-c", "python -m pipeline"]  # shell form


def test_entrypoint_resets_an_inherited_cmd_only():
    inherited = parse_dockerfile('FROM x AS a\nCMD ["--help"]\nFROM a\nENTRYPOINT ["tool"]\n')
    assert (inherited.entrypoint, inherited.cmd) == (["tool"], [])
    same_stage = parse_dockerfile('FROM x\nCMD ["--help"]\nENTRYPOINT ["tool"]\n')
    assert (same_stage.entrypoint, same_stage.cmd) == (["tool"], ["--help"])


def test_the_checkouts_dockerfile_describes_an_image_the_stand_in_can_run():
    image = parse_dockerfile((REPO_ROOT / "Dockerfile").read_text())
    assert image.workdir == "/app"
    assert image.env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert image.entrypoint + image.cmd, "the image must have a default command"


IMAGE = ImageConfig(entrypoint=["python", "-m", "pipeline"], cmd=["--help"])


@pytest.mark.parametrize("command, args, expected", [
    (["fake"], ["a", "b"], ["fake", "a", "b"]),                    # command + args: the image's are ignored
    (None, ["pretrain"], ["python", "-m", "pipeline", "pretrain"]),  # args replace CMD, ENTRYPOINT stays
    (["fake"], None, ["fake"]),                                      # command alone drops CMD too
    (None, None, ["python", "-m", "pipeline", "--help"]),            # neither: ENTRYPOINT + CMD
    ([], [], ["python", "-m", "pipeline", "--help"]),                # empty lists count as unset
])
def test_kubernetes_argv_rule(command, args, expected):
    assert container_argv(IMAGE, command, args) == expected


def test_no_command_at_all_cannot_start():
    with pytest.raises(ValueError, match="no command specified"):
        container_argv(ImageConfig(), None, None)


POD = {"metadata": {"name": "p-0-abcde", "namespace": "ml", "uid": "u1",
                    "annotations": {"batch.kubernetes.io/job-completion-index": "1"}}, "spec": {}}


def test_container_env_resolves_like_the_kubelet():
    config = {"settings": {"A": "1", "B": "2"}}
    secrets = {"creds": {"KEY": "k", "TOKEN": "t"}}
    container = {
        "envFrom": [{"configMapRef": {"name": "settings"}}, {"secretRef": {"name": "creds"}, "prefix": "S_"},
                    {"secretRef": {"name": "absent", "optional": True}}],
        "env": [{"name": "URL", "value": "http://$(A):$(NOPE)/$$(A)"},
                {"name": "RANK", "valueFrom": {"fieldRef": {
                    "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "PICKED", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}},
                {"name": "SKIPPED", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "C",
                                                                      "optional": True}}}],
    }
    env = container_env(POD, container, config.get, secrets.get)
    assert env == {"A": "1", "B": "2", "S_KEY": "k", "S_TOKEN": "t", "URL": "http://1:$(NOPE)/$(A)",
                   "RANK": "1", "POD": "p-0-abcde", "PICKED": "t"}


@pytest.mark.parametrize("container, message", [
    ({"envFrom": [{"secretRef": {"name": "s3-credentials"}}]}, 'secret "s3-credentials" not found'),
    ({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "C"}}}]},
     "couldn't find key C in ConfigMap ml/settings"),
])
def test_missing_references_are_config_errors(container, message):
    with pytest.raises(ConfigError, match=message):
        container_env(POD, container, {"settings": {"A": "1"}}.get, {}.get)


def test_image_paths_map_into_this_checkout_and_a_per_pod_tmp(tmp_path):
    paths = image_paths({"VIRTUAL_ENV": "/opt/venv"}, "/app", REPO_ROOT, tmp_path / "pod-tmp")
    assert paths.value("/tmp") == str(tmp_path / "pod-tmp")
    assert paths.value("/tmp/cache") == str(tmp_path / "pod-tmp" / "cache")
    assert paths.value(f"/opt/venv/bin:{DEFAULT_PATH}").split(":")[0] == str(Path(sys.executable).parent)
    assert paths("/app/params.yaml") == str(REPO_ROOT / "params.yaml")
    assert paths.value("/tmpfoo") == "/tmpfoo" and paths.value("not/a/path") == "not/a/path"
    assert PathMap({"/": "/elsewhere"})("/etc") == "/etc"  # a WORKDIR of / maps nothing


def test_dollar_paren_expansion():
    assert expand("$(A)-$(B)-$$(A)-$(", {"A": "x"}) == "x-$(B)-$(A)-$("
