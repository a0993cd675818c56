"""Errors that map to the pipeline's exit codes (README.md, "Exit codes").

Exit 2 means "your configuration or your data is wrong": never retried by the flow,
never worth a GPU-hour. Every problem is collected and reported at once, each naming
the key, file or folder at fault, so a user fixes everything in one edit.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_SIGTERM = 143  # 128 + SIGTERM(15): the shell's convention, what Kubernetes reports too


class UserInputError(Exception):
    """Bad configuration or bad input data. Carries every problem found, one per line."""

    kind = "input"

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{len(self.problems)} {self.kind} problem(s):"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class ConfigError(UserInputError):
    kind = "configuration"


class DataError(UserInputError):
    kind = "data"


class Terminated(BaseException):
    """SIGTERM received; training state was checkpointed. Maps to exit 143.

    Here, not beside the fit driver, so the CLI (and with it every data stage) imports no training code."""

    exit_code = EXIT_SIGTERM


class PreflightError(RuntimeError):
    """The job's shape or network does not match its configuration (an infrastructure fault)."""
