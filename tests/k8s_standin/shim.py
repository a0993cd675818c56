"""The container shim: runs one container's process in an image's root filesystem, as containerd-shim + runc do.

    python -m tests.k8s_standin.shim SPEC.json

SPEC: {"rootfs", "argv", "env", "uid", "gid", "workdir", "hostname", "netns", "mounts": [[src, dst, ro]],
"read_only_root"}.
The shim joins the pod's network namespace, makes new mount, UTS, IPC and PID namespaces and forks
the container's init: it mounts /proc, a fresh /dev (null, zero, full, random, urandom, tty and a
tmpfs /dev/shm), a read-only /sys and the pod's volumes into the rootfs, chroots, drops to the
container's user and execs the container's command as PID 1 of its own PID namespace.

As on a cluster: a SIGTERM (or SIGINT) sent to the shim reaches PID 1 only, which ignores it unless it
handles it; when PID 1 exits, the kernel kills every other process in the container; a SIGKILL of the
shim kills PID 1 (parent-death signal) and with it the whole container. The shim exits with the
container's code, 128+N for a signal N.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None, flags,
                      data.encode() if data else None), f"mount {src} on {dst}")


def inside(root: str, path: str) -> str:
    """`path` as seen from inside `root`, every symlink resolved within it (runc's securejoin): an image's
    /var/run -> /run must not lead a mount out to the host's /run."""
    parts, resolved, hops = [p for p in path.split("/") if p], "", 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            resolved = resolved.rsplit("/", 1)[0]
            continue
        candidate = f"{resolved}/{part}"
        if os.path.islink(root + candidate):
            hops += 1
            if hops > 40:
                raise OSError(f"too many levels of symbolic links in {path}")
            target = os.readlink(root + candidate)
            parts = [p for p in target.split("/") if p] + parts
            resolved = "" if target.startswith("/") else resolved
            continue
        resolved = candidate
    return root + resolved


def bind(src: str, dst: str, read_only: bool) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            open(dst, "a").close()
    mount(src, dst, None, MS_BIND | MS_REC)
    if read_only:
        mount("none", dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def container_init(spec: dict, alive: int) -> None:
    """In the new namespaces, as the forked child: set up the rootfs, then exec (never returns)."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    root = spec["rootfs"]
    mount(root, root, None, MS_BIND | MS_REC)  # the rootfs as a mount of its own: it can be made read-only
    hostname = spec["hostname"].encode()
    _check(libc.sethostname(hostname, len(hostname)), "sethostname")
    os.makedirs(f"{root}/proc", exist_ok=True)
    mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(f"{root}/dev", exist_ok=True)
    mount("tmpfs", f"{root}/dev", "tmpfs", MS_NOSUID, "mode=755")
    for dev in DEVICES:
        bind(f"/dev/{dev}", f"{root}/dev/{dev}", read_only=False)
    os.makedirs(f"{root}/dev/shm")
    mount("shm", f"{root}/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=1g")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    bind("/sys", f"{root}/sys", read_only=True)
    for src, dst, read_only in spec.get("mounts", []):
        bind(src, inside(root, dst), read_only)
    if spec.get("read_only_root"):  # readOnlyRootFilesystem: the volumes above stay writable
        mount("none", root, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    os.chroot(root)
    os.chdir("/")
    uid, gid = spec.get("uid", 0), spec.get("gid", 0)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    # A change of credentials clears the parent-death signal: set it again, then make sure the shim did
    # not die in between (it would never be delivered).
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([alive], [], [], 0)[0]:  # EOF: the shim, which holds the write end, is gone
        os._exit(137)
    workdir = spec.get("workdir") or "/"
    try:
        os.chdir(workdir)
    except OSError as err:
        _fail(f"chdir to cwd ({workdir!r}) set in config.json failed: {err.strerror}", 128)
    argv, env = spec["argv"], spec["env"]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as err:
        _fail(f"exec: {argv[0]!r}: {err.strerror}", 128)


def _fail(message: str, code: int) -> None:
    # What runc reports when the container process cannot start; the kubelet reads it as StartError.
    sys.stderr.write(f"standin-shim: unable to start container process: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def main(path: str) -> int:
    with open(path) as handle:
        spec = json.load(handle)
    fd = os.open(f"/run/netns/{spec['netns']}", os.O_RDONLY)
    _check(libc.setns(fd, CLONE_NEWNET), "setns")
    os.close(fd)
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID), "unshare")
    mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing mounted for the container leaks to the host
    alive, keep = os.pipe()  # the child sees EOF on `alive` once the shim has died (both close on exec)
    child = os.fork()
    if child == 0:
        os.close(keep)
        try:
            container_init(spec, alive)
        except BaseException as err:  # noqa: BLE001 - report and exit, never return into the shim
            _fail(str(err), 128)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
