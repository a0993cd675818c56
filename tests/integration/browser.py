"""Headless Chromium from the command line: the rendered DOM of a page, or a screenshot.

The Prefect UI is a single-page app: the HTML the server sends is an empty shell, and the
run's state appears only after the app's JavaScript has fetched it from the API. Chromium's
`--virtual-time-budget` lets the page run that long (in virtual time, which waits for
network fetches) before the DOM is dumped or the screenshot taken.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
    "--hide-scrollbars", "--window-size=1400,1000",
]


def chromium_path() -> str | None:
    explicit = os.environ.get("CHROMIUM")
    if explicit and Path(explicit).exists():
        return explicit
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(browser: str, url: str, action: list[str], budget_ms: int, timeout_s: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *action, url],
            capture_output=True, text=True, timeout=timeout_s,
        )


def dump_dom(browser: str, url: str, wait_for: list[str] = (), budgets_ms=(15_000, 30_000, 60_000),
             timeout_s: float = 120) -> str:
    """The DOM after the page had `budget` ms of virtual time; longer budgets until `wait_for` all show."""
    dom = ""
    for budget in budgets_ms:
        done = _run(browser, url, ["--dump-dom"], budget, timeout_s)
        dom = done.stdout
        if done.returncode == 0 and all(text in dom for text in wait_for):
            break
    return dom


def screenshot(browser: str, url: str, out: Path, budget_ms: int = 20_000, timeout_s: float = 120) -> Path:
    out = Path(out).resolve()
    out.unlink(missing_ok=True)
    done = _run(browser, url, [f"--screenshot={out}"], budget_ms, timeout_s)
    if not out.exists():
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return out
