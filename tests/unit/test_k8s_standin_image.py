"""The stand-in's container semantics: the Kubernetes argv rule, the environment and user as the
kubelet builds them (no host variables), and image references as a registry and the kubelet parse them."""
from __future__ import annotations

import pytest

from tests.k8s_standin.image import ImageConfig, container_argv
from tests.k8s_standin.podspec import ConfigError, container_env, expand, run_as
from tests.k8s_standin.runtime import PullError, Registry

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


def test_dollar_paren_expansion():
    assert expand("$(A)-$(B)-$$(A)-$(", {"A": "x"}) == "x-$(B)-$(A)-$("


DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("ref", [
    f"registry.example/pipeline:{DIGEST}",  # what Prefect makes of a digest reference split as name:tag
    "Registry.example/Pipeline:1",  # upper case in the path
    "registry.example/pipeline:",  # empty tag
    "registry.example/pipeline@sha256:short",
])
def test_invalid_references_are_invalid_image_names(ref):
    with pytest.raises(PullError) as err:
        Registry({"registry.example/pipeline": "localhost/pipeline:dev"}).resolve(ref, set())
    assert err.value.reason == "InvalidImageName" and "invalid reference format" in err.value.message


def test_unknown_repositories_and_private_registries_fail_to_pull():
    registry = Registry({"registry.example/pipeline": "localhost/x"}, private={"registry.example"})
    with pytest.raises(PullError, match="401 Unauthorized") as err:
        registry.resolve("registry.example/pipeline:1", set())
    assert err.value.reason == "ErrImagePull"
    assert registry.resolve("registry.example/pipeline:1", {"registry.example"}) == "localhost/x"
    with pytest.raises(PullError, match="not found"):
        registry.resolve("ghcr.io/other/image:1", set())


def _passwd(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:10001:10001::/tmp:/bin/false\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\napp:x:10001:\n")
    return str(tmp_path)


def test_user_comes_from_the_security_context_else_the_image(tmp_path):
    rootfs = _passwd(tmp_path)
    pod = {"spec": {"securityContext": {"runAsUser": 2000}}}
    assert run_as(pod, {"securityContext": {"runAsGroup": 3000}}, ImageConfig(user="app"), rootfs) == (2000, 3000)
    assert run_as({"spec": {}}, {}, ImageConfig(user="app"), rootfs) == (10001, 10001)
    assert run_as({"spec": {}}, {}, ImageConfig(user="10001:10001"), rootfs) == (10001, 10001)
    with pytest.raises(ConfigError, match="runAsNonRoot and image will run as root"):
        run_as({"spec": {"securityContext": {"runAsNonRoot": True}}}, {}, ImageConfig(), rootfs)
