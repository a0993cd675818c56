"""Following a stage's pod logs: one thread per pod, each line prefixed `[rank N] `, a copy kept on disk."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterable

from kubernetes import client as k8s

from pipeline.launch.k8s_manifests import COMPLETION_INDEX_ANNOTATION, CONTAINER_NAME


class PodLogStreams:
    """One thread per pod: follows its log, prefixes `[rank N] `, keeps a copy on disk."""

    def __init__(self, core: k8s.CoreV1Api, namespace: str, folder: Path, log: Callable[[str], None]):
        self.core, self.namespace, self.folder, self.log = core, namespace, folder, log
        self.threads: dict[str, threading.Thread] = {}
        self.lock = threading.Lock()  # one writer at a time for log() and the files

    def follow(self, pods: Iterable[k8s.V1Pod]) -> None:
        for pod in pods:
            name = pod.metadata.name
            if name in self.threads or pod.status.phase not in ("Running", "Succeeded", "Failed"):
                continue
            rank = (pod.metadata.annotations or {}).get(COMPLETION_INDEX_ANNOTATION, "?")
            thread = threading.Thread(target=self._stream, args=(name, rank), daemon=True)
            self.threads[name] = thread
            thread.start()

    def _stream(self, pod_name: str, rank: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # Append: a replacement pod (same rank, after preemption) continues the same file.
        with open(self.folder / f"rank-{rank}.log", "a", encoding="utf-8") as copy:
            self._emit(copy, f"[rank {rank}] --- pod {pod_name} ---")
            try:
                resp = self.core.read_namespaced_pod_log(
                    pod_name, self.namespace, container=CONTAINER_NAME, follow=True,
                    _preload_content=False)
                for line in _lines(resp.stream(4096)):
                    self._emit(copy, f"[rank {rank}] {line}")
            except Exception as err:  # a log stream must never take the run down with it
                self._emit(copy, f"[rank {rank}] log stream ended: {err}")

    def _emit(self, copy, line: str) -> None:
        with self.lock:
            copy.write(line + "\n")
            copy.flush()
            self.log(line)

    def join(self, timeout: float = 30.0) -> None:
        for thread in self.threads.values():
            thread.join(timeout)


def _lines(chunks: Iterable[bytes]) -> Iterable[str]:
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        yield from (line.decode("utf-8", "replace") for line in complete)
    if buffer:
        yield buffer.decode("utf-8", "replace")
