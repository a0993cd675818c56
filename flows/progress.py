"""Live progress of a training stage in the Prefect UI, read from the stage's own output lines.

`run_stage` hands the launcher `StageProgress(...).log` instead of `logger.info`: every line still goes
to the task's log unchanged, and the lines `pipeline/training/callbacks.py`'s ProgressLines prints

    [pretrain] world_size=2 global_rank=0 node_rank=0 start_step=0 total_steps=540
    [pretrain] step 40/540 epoch 1 loss 0.4123 lr 2.1e-03 (12.3 steps/s)
    [finetune:scratch] epoch 1 val/acc 0.9120

become two artifacts of the stage's task run: a progress bar (`progress-<stage>`: percent of the
stage's optimizer steps) and a markdown line (`progress-<stage>-detail`: percent, step, ETA, current
loss, last val/acc). The same text arrives from Kubernetes pods prefixed `[rank N] ` (the launcher's
log streams); only rank 0's lines count, so no extra API is needed.

A stage with several fits in sequence (finetune: `finetuned`, then `scratch`) is one bar: each variant
is an equal share, so the bar reaches 100 when the last variant's last step is printed.
Updates go to the API at most every `interval_s` seconds; the last step of the last part, and the
state at the end of the stage, are always published. Publishing never fails the stage.
"""
from __future__ import annotations

import contextvars
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

RANK_PREFIX = re.compile(r"^\[rank (?P<rank>[^\]]+)\] ")
_LABEL = r"\[(?P<label>[a-z_]+(?::[a-z0-9_-]+)?)\]"
START = re.compile(_LABEL + r" world_size=\d+ global_rank=(?P<rank>\d+) .*?start_step=(?P<start>\d+) "
                   r"total_steps=(?P<total>\d+)")
STEP = re.compile(_LABEL + r" step (?P<step>\d+)/(?P<total>\d+) epoch (?P<epoch>\d+) loss (?P<loss>\S+) "
                  r"lr \S+ \((?P<rate>[\d.]+|nan|inf) steps/s\)")
VAL = re.compile(_LABEL + r" epoch (?P<epoch>\d+) val/acc (?P<acc>[\d.]+|nan)")


@dataclass
class Progress:
    """One parsed line: `label` is `stage` or `stage:variant`."""
    label: str
    kind: str  # "start" | "step" | "val"
    step: int | None = None
    total: int | None = None
    start_step: int | None = None
    epoch: int | None = None
    loss: float | None = None
    steps_per_s: float | None = None
    val_acc: float | None = None

    @property
    def stage(self) -> str:
        return self.label.split(":", 1)[0]


def parse(line: str) -> Progress | None:
    """A ProgressLines line (locally, or from a pod with `[rank N] `) -> Progress; anything else -> None.
    Lines of ranks other than 0 are ignored (rank 0 is the one that prints steps)."""
    prefix = RANK_PREFIX.match(line)
    if prefix:
        if prefix["rank"] != "0":
            return None
        line = line[prefix.end():]
    if match := STEP.match(line):
        return Progress(match["label"], "step", step=int(match["step"]), total=int(match["total"]),
                        epoch=int(match["epoch"]), loss=float(match["loss"]), steps_per_s=float(match["rate"]))
    if match := START.match(line):
        if match["rank"] != "0":
            return None
        return Progress(match["label"], "start", step=int(match["start"]), total=int(match["total"]),
                        start_step=int(match["start"]))
    if match := VAL.match(line):
        return Progress(match["label"], "val", epoch=int(match["epoch"]), val_acc=float(match["acc"]))
    return None


def format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StageProgress:
    """Wraps a stage's `log` callback; see the module docstring.

    `parts`: the labels the stage fits, in order (finetune: ["finetune:finetuned", "finetune:scratch"]);
    a label not listed is appended. `publish=False` only parses (unit tests, or no Prefect run context).
    Call `close(completed)` when the stage process has ended."""

    def __init__(self, stage: str, log: Callable[[str], None], parts: list[str] | None = None,
                 interval_s: float = 3.0, publish: bool = True, clock: Callable[[], float] = time.monotonic):
        self.stage, self._log, self.interval_s, self._clock = stage, log, interval_s, clock
        self.parts = list(parts or [stage])
        self.done: dict[str, float] = {}  # label -> fraction of that part done
        self.start_step: dict[str, int] = {}
        self.last: Progress | None = None  # last step line
        self.val_acc: dict[str, float] = {}
        self.published_at: float | None = None
        self.dirty = False
        self.lock = threading.Lock()  # Kubernetes: one log thread per pod
        self.publish = publish
        self._context = contextvars.copy_context() if publish else None  # the task run's, for pod log threads
        self._progress_id = self._detail_id = None
        self._failed = False
        self.published: list[float] = []  # percents sent, for tests

    # -- the `log` callback
    def log(self, line: str) -> None:
        self._log(line)
        try:
            self.observe(line)
        except Exception as exc:  # noqa: BLE001 - progress is a view; it never fails a stage
            self._warn(exc)

    __call__ = log

    def observe(self, line: str) -> None:
        item = parse(line)
        if item is None or item.stage != self.stage:
            return
        with self.lock:
            if item.label not in self.parts:
                self.parts.append(item.label)
            if item.kind == "start":
                self.start_step[item.label] = item.start_step or 0
                self.done.setdefault(item.label, (item.step or 0) / max(item.total or 1, 1))
            elif item.kind == "step":
                self.done[item.label] = min(item.step / max(item.total, 1), 1.0)
                self.last = item
            else:
                self.val_acc[item.label] = item.val_acc
            self.dirty = True
            final = item.kind == "step" and item.step >= item.total and item.label == self.parts[-1]
            now = self._clock()
            if final or self.published_at is None or now - self.published_at >= self.interval_s:
                self._publish(now)

    # -- what is shown
    def percent(self) -> float:
        shares = [self.done.get(label, 0.0) for label in self.parts]
        return round(100.0 * sum(shares) / len(shares), 1)

    def eta_s(self) -> float | None:
        """Remaining steps of the current part at its rate, plus the parts not started at the same pace."""
        item = self.last
        if item is None or not item.steps_per_s or not math.isfinite(item.steps_per_s):
            return None
        # ProgressLines' rate counts from step 0 even after a resume: correct it to the steps this process took.
        start = self.start_step.get(item.label, 0)
        rate = item.steps_per_s * (item.step - start) / item.step if item.step > start else item.steps_per_s
        if rate <= 0:
            return None
        later = self.parts[self.parts.index(item.label) + 1:] if item.label in self.parts else []
        return (item.total - item.step + item.total * len(later)) / rate

    def markdown(self) -> str:
        item = self.last
        rows = [f"| {self.stage} | |", "|---|---|", f"| progress | **{self.percent():.1f}%** |"]
        if item is not None:
            part = f" ({item.label}, part {self.parts.index(item.label) + 1} of {len(self.parts)})" \
                if len(self.parts) > 1 else ""
            rows += [f"| step | {item.step}/{item.total}{part}, epoch {item.epoch} |",
                     f"| ETA | {format_eta(self.eta_s())} |",
                     f"| loss | {item.loss:.4f} |",
                     f"| throughput | {item.steps_per_s:.1f} steps/s |"]
        for label, acc in self.val_acc.items():
            rows.append(f"| last val/acc ({label}) | {acc:.4f} |")
        return "\n".join(rows)

    # -- publishing
    def close(self, completed: bool = False) -> None:
        """The stage ended: publish what is pending (100% if it completed and showed progress)."""
        with self.lock:
            if completed and self.done:
                for label in self.parts:
                    self.done[label] = 1.0
                self.dirty = True
            if self.dirty:
                self._publish(self._clock())

    def _publish(self, now: float) -> None:
        self.published_at, self.dirty = now, False
        percent = self.percent()
        self.published.append(percent)
        if not self.publish or self._failed:
            return
        try:
            self._context.run(self._send, percent, self.markdown())
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    def _send(self, percent: float, markdown: str) -> None:
        from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        description = f"{self.stage}: percent of its optimizer steps (live)"
        if self._progress_id is None:
            self._progress_id = create_progress_artifact(progress=percent, key=f"progress-{self.stage}",
                                                         description=description)
            self._detail_id = create_markdown_artifact(markdown=markdown, key=f"progress-{self.stage}-detail",
                                                       description=f"{self.stage}: progress, ETA, loss (live)")
            return
        update_progress_artifact(artifact_id=self._progress_id, progress=percent)
        with get_client(sync_client=True) as client:
            client.update_artifact(artifact_id=self._detail_id, artifact=ArtifactUpdate(data=markdown))

    def _warn(self, exc: Exception) -> None:
        if not self._failed:
            self._failed = True
            self._log(f"(progress artifacts disabled for {self.stage}: {type(exc).__name__}: {exc})")
