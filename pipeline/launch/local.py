"""Run a stage as a local subprocess, streaming its output line by line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.launch import StageCommand


class LocalLauncher:
    def __init__(self, workdir: Path | str = ".", python: str = sys.executable, grace_s: float = 30.0):
        self.workdir, self.python, self.grace_s = Path(workdir), python, grace_s

    def argv(self, cmd: StageCommand) -> list[str]:
        return [self.python, "-m", "pipeline", cmd.stage, *cmd.args]

    def run(self, cmd: StageCommand, log: Callable[[str], None]) -> int:
        env = {**os.environ, **cmd.env, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            self.argv(cmd), cwd=self.workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True,  # its own group: a cancel stops the stage, not us
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log(line.rstrip("\n"))
            code = process.wait()
        except BaseException:
            # Flow cancelled or crashed: give the stage its SIGTERM checkpoint, then make sure it is gone.
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            raise
        # A process killed by a signal reports -N; report it as the shell (and Kubernetes) would.
        return 128 - code if code < 0 else code
