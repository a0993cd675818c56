"""An image's runtime config as a container runtime reads it, and the Kubernetes argv rule.

The config comes from the built image itself (runtime.image_config reads it with buildah), never
from parsing the Dockerfile: what the pods run is what `make image` built.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Docker's default


@dataclass
class ImageConfig:
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    workdir: str = "/"
    user: str = ""  # USER: "uid[:gid]" or a name; empty means root


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
