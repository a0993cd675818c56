"""The node's container runtime: images as a registry would serve them, pulls with a cluster's timings,
and containers made by buildah from a locally built image and run by the shim (tests/k8s_standin/shim.py).

Registry: a pod's `image` must be a valid reference (else InvalidImageName) that the stand-in's registry
holds: `images` maps references (`ghcr.io/example/pipeline:0.1.0`) to local images (`localhost/pipeline:dev`,
built by `make image`); a digest reference `NAME@sha256:D` is served when NAME is known and D is that local
image's manifest digest, as a registry would. Anything else fails like containerd's pull (ErrImagePull,
then ImagePullBackOff). Registries listed in `private` answer 401 unless the pod names an imagePullSecret of
type kubernetes.io/dockerconfigjson with an entry for that registry.
"""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field

from tests.k8s_standin.image import ImageConfig

# github.com/distribution/reference's grammar (what containerd and the kubelet parse with).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?)"
REFERENCE = re.compile(rf"^(?P<name>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)"
                       rf"(?::(?P<tag>[\w][\w.-]{{0,127}}))?(?:@(?P<digest>sha256:[0-9a-f]{{64}}))?$")


class PullError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _buildah(*args: str) -> str:
    done = subprocess.run(["buildah", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"buildah {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def registry_host(ref: str) -> str:
    first = ref.split("/", 1)[0]
    return first if "/" in ref and ("." in first or ":" in first or first == "localhost") else "docker.io"


@dataclass
class Registry:
    # What the registry serves: a repository (`registry.example/pipeline`: every tag, and the image's
    # digest) or one exact reference, mapped to the local image (containers-storage name) behind it.
    images: dict[str, str]
    private: set[str] = field(default_factory=set)  # registry hosts that need a pull secret

    def resolve(self, ref: str, auths: set[str]) -> str:
        """The local image for `ref`, or PullError as the kubelet would report it."""
        match = REFERENCE.match(ref)
        if not match:
            raise PullError("InvalidImageName", f'Failed to apply default image tag "{ref}": couldn\'t parse '
                                                f'image name "{ref}": invalid reference format')
        host = registry_host(ref)
        if host in self.private and host not in auths:
            raise PullError("ErrImagePull", f'failed to pull and unpack image "{ref}": failed to resolve reference '
                                            f'"{ref}": pull access denied, repository does not exist or may require '
                                            f'authorization: authorization failed: 401 Unauthorized')
        local = self.images.get(ref) or self.images.get(match["name"])
        if local is not None and match["digest"] and image_digest(local) != match["digest"]:
            local = None  # the repository exists, but holds no manifest with that digest
        if local is None:
            raise PullError("ErrImagePull", f'failed to pull and unpack image "{ref}": failed to resolve reference '
                                            f'"{ref}": {ref}: not found')
        return local


_digests: dict[str, str] = {}
_configs: dict[str, ImageConfig] = {}


def image_digest(local: str) -> str:
    if local not in _digests:
        _digests[local] = _buildah("images", "--digests", "--format", "{{.Digest}}", local).splitlines()[0]
    return _digests[local]


def image_config(local: str) -> ImageConfig:
    """ENTRYPOINT, CMD, ENV, WORKDIR and USER from the image's own config."""
    if local not in _configs:
        config = json.loads(_buildah("inspect", "--type", "image", local))["OCIv1"]["config"]
        env = dict(item.split("=", 1) for item in config.get("Env") or [])
        _configs[local] = ImageConfig(entrypoint=config.get("Entrypoint") or [], cmd=config.get("Cmd") or [],
                                      env=env, workdir=config.get("WorkingDir") or "/", user=config.get("User") or "")
    return _configs[local]


class Pulls:
    """Which images the node holds, and pulls in progress (`seconds` per first pull of an image)."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.lock = threading.Lock()
        self._ready: dict[str, float] = {}  # local image -> when its pull completes

    def ready(self, key: str) -> bool:
        """Start a pull for `key` (an image, or a pod on a node of its own) if none is under way; True once
        it is done. imagePullPolicy Always on an image already present costs only a manifest check."""
        with self.lock:
            now = time.monotonic()
            if key not in self._ready:
                self._ready[key] = now + self.seconds
            return now >= self._ready[key]


class Containers:
    """Containers on the node: buildah working containers, mounted, removed with their pod."""

    def create(self, key: str, local: str) -> tuple[str, str]:
        name = f"standin-{key}"
        subprocess.run(["buildah", "rm", name], capture_output=True)  # a leftover of an earlier run
        _buildah("from", "--pull=never", "--name", name, f"containers-storage:{local}")
        return name, _buildah("mount", name)

    @staticmethod
    def remove(name: str) -> None:
        subprocess.run(["buildah", "umount", name], capture_output=True)
        subprocess.run(["buildah", "rm", name], capture_output=True)
