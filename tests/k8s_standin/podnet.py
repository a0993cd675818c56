"""The pod network: one network namespace per pod, each with its own address, as a CNI gives it.

Layout (all of it made by the stand-in, in a private /24 that exists only inside these namespaces,
and removed on close):

    node namespace  `<prefix>node`: bridge `br0` with the node address  10.R.S.1/24
    pod namespaces  `<prefix>pN`:   `eth0` (a veth whose peer sits on br0), 10.R.S.N/24, default route via .1

Pods reach each other directly (MASTER_ADDR, the headless Service's names) and the node at .1, where
the stand-in serves cluster DNS and forwards the few services the tests run on the host's loopback
(API server, S3, Prefect): `expose(port)` listens on the node address inside the node namespace and
relays each connection to 127.0.0.1:port in the host's own namespace, so the host's network is never
changed and nothing on it listens beyond loopback.
"""
from __future__ import annotations

import ctypes
import os
import random
import socket
import subprocess
import threading
from typing import Callable

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def socket_in(netns: str, kind: int, address: tuple[str, int]) -> socket.socket:
    """A socket bound inside network namespace `netns` (a socket keeps the namespace it was made in).

    setns() changes only the calling thread's namespace, so a short-lived thread makes it."""
    made: dict = {}

    def make() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, kind)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            made["sock"] = sock
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            made["err"] = err

    thread = threading.Thread(target=make, name=f"setns-{netns}")
    thread.start()
    thread.join()
    if "err" in made:
        raise made["err"]
    return made["sock"]


class PodNetwork:
    def __init__(self, prefix: str | None = None):
        # Namespace names are global to the machine: drawn from os.urandom, not from `random`, which a training
        # test seeds (seed_everything), so two pytest-xdist workers would draw the same name.
        draw = random.SystemRandom()
        self.prefix = prefix or f"sti{draw.randrange(16**4):04x}"
        r, s = draw.randrange(200, 250), draw.randrange(0, 256)
        self.subnet = f"10.{r}.{s}"
        self.node_ip = f"{self.subnet}.1"
        self.node_ns = f"{self.prefix}node"
        self._free = list(range(2, 255))
        self._pods: dict[str, tuple[str, str]] = {}  # key -> (netns, ip)
        self._closers: list[Callable[[], None]] = []
        self._exposed: set[int] = set()
        self._stop = threading.Event()
        self.lock = threading.Lock()
        _ip("netns", "add", self.node_ns)
        try:
            _ip("-n", self.node_ns, "link", "set", "lo", "up")
            _ip("-n", self.node_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.node_ns, "addr", "add", f"{self.node_ip}/24", "dev", "br0")
            _ip("-n", self.node_ns, "link", "set", "br0", "up")
        except OSError:
            self.close()
            raise

    # ---- pods ------------------------------------------------------------------------------------
    def add_pod(self, key: str) -> tuple[str, str]:
        """A namespace with its own address for pod `key`: (namespace name, pod IP)."""
        with self.lock:
            n = self._free.pop(0)
        netns, ip, peer = f"{self.prefix}p{n}", f"{self.subnet}.{n}", f"v{self.prefix[-4:]}p{n}"
        _ip("netns", "add", netns)
        try:
            _ip("-n", self.node_ns, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("-n", self.node_ns, "link", "set", peer, "master", "br0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", netns, "route", "add", "default", "via", self.node_ip)
        except OSError:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
            raise
        with self.lock:
            self._pods[key] = (netns, ip)
        return netns, ip

    def remove_pod(self, key: str) -> None:
        """The pod's namespace (and with it its veth) goes; its address is free again."""
        with self.lock:
            entry = self._pods.pop(key, None)
        if entry:
            subprocess.run(["ip", "netns", "del", entry[0]], capture_output=True)
            with self.lock:
                self._free.append(int(entry[1].rsplit(".", 1)[1]))

    # ---- the node's services -----------------------------------------------------------------------
    def expose(self, port: int, node_port: int | None = None) -> str:
        """Relay node_ip:node_port (inside the pod network) to the host's 127.0.0.1:port; returns
        "node_ip:node_port"."""
        node_port = node_port or port
        if node_port in self._exposed:
            return f"{self.node_ip}:{node_port}"
        self._exposed.add(node_port)
        listener = socket_in(self.node_ns, socket.SOCK_STREAM, (self.node_ip, node_port))
        listener.listen(64)
        listener.settimeout(0.5)
        self._closers.append(listener.close)
        threading.Thread(target=self._accept, args=(listener, port), daemon=True,
                         name=f"node-forward-{node_port}").start()
        return f"{self.node_ip}:{node_port}"

    def _accept(self, listener: socket.socket, port: int) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            conn.settimeout(None)
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_pipe, args=(src, dst), daemon=True).start()

    def serve_udp(self, port: int, handler: Callable[[bytes], bytes | None]) -> None:
        """A UDP service on node_ip:port (cluster DNS): handler(request) -> reply or None."""
        sock = socket_in(self.node_ns, socket.SOCK_DGRAM, (self.node_ip, port))
        sock.settimeout(0.5)
        self._closers.append(sock.close)

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    data, peer = sock.recvfrom(4096)
                except (TimeoutError, socket.timeout):
                    continue
                except OSError:
                    return
                try:
                    reply = handler(data)
                except Exception:  # noqa: BLE001 - one bad packet must not stop DNS
                    reply = None
                if reply:
                    sock.sendto(reply, peer)

        threading.Thread(target=loop, daemon=True, name=f"node-udp-{port}").start()

    def close(self) -> None:
        self._stop.set()
        for close in self._closers:
            try:
                close()
            except OSError:
                pass
        with self.lock:
            names = [netns for netns, _ in self._pods.values()]
            self._pods.clear()
        for netns in names + [self.node_ns]:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass
