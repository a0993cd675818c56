"""Shared helpers for the pipeline tests: tiny configs, isolated output roots, CLI runners.

Tests never write into the repository's data/, models/, reports/ or checkpoints/: in-process
runs point `paths.root` at a tmp folder; subprocess runs use a tmp cwd holding a copy of
params.yaml.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.params import load_config
from pipeline.localserver import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS = REPO_ROOT / "params.yaml"
PYTHON = sys.executable

# Small enough that the whole pipeline runs in seconds on a 2-core CPU, large enough that
# every code path (freeze then unfreeze, validation, checkpointing) runs.
TINY = [
    "pretrain.epochs=1",
    "pretrain.glyphs_per_class=20",
    "pretrain.batch_size=32",
    "pretrain.model.width=8",
    "pretrain.model.depth=1",
    "finetune.epochs=2",
    "finetune.freeze_backbone_epochs=1",
    "finetune.labels_per_class=5",
    "finetune.batch_size=16",
    "trainer.log_every_n_steps=1",
]


def tiny_config(root: Path, *extra: str) -> Config:
    """The repo's params.yaml + TINY + `extra`, with every output under `root`."""
    return load_config(PARAMS, [*TINY, f"paths.root={root}", *extra])


def run_stages(cfg: Config, *names: str) -> dict:
    from pipeline.stages import STAGES, stage_runner

    return {name: stage_runner(name)(cfg) for name in (names or STAGES)}


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # This checkout's code and this interpreter's tools (dvc, python) come first.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(PYTHON).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def dvc_env(own_code: bool = True, **extra: str) -> dict[str, str]:
    """Env for real `dvc` and `git` commands in a test's project: a committer identity, no analytics.
    own_code: the project's stages import its own copy of `pipeline` (found in cwd by `python -m`), not this
    checkout's."""
    env = subprocess_env(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
                         GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    if own_code:
        env.pop("PYTHONPATH")
    env.update(extra)
    return env


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def sigterm_at_step(cmd: list[str], cwd: Path, min_step: int, env: dict[str, str] | None = None,
                    timeout: float = 120) -> tuple[int, str, int | None]:
    """Run a training stage, SIGTERM it once its progress lines (read with the product's own parser,
    flows/progress.py) report `min_step` -> (exit code, its output with stderr, the step it was signalled at)."""
    from flows.progress import parse

    proc = subprocess.Popen(cmd, cwd=cwd, env=env or subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen, signalled_at = [], None
    try:
        for line in proc.stdout:
            seen.append(line)
            progress = parse(line)
            if progress and progress.kind == "step" and progress.step >= min_step:
                signalled_at = progress.step
                proc.send_signal(signal.SIGTERM)
                break
        seen.append(proc.communicate(timeout=timeout)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, "".join(seen), signalled_at


def step_numbers(output: str, label: str = "pretrain") -> list[int]:
    """The steps of `label`'s progress lines in a stage's output (flows/progress.py's parser)."""
    from flows.progress import parse

    return [p.step for p in map(parse, output.splitlines()) if p and p.kind == "step" and p.label == label]


def run_cli(args: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a real subprocess."""
    return subprocess.run([PYTHON, "-m", "pipeline", *args], cwd=cwd, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]



def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_image_folder(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    """A valid ImageFolder of real 8x8 digits (sklearn's) as grayscale PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(classes):
        chosen = np.flatnonzero(digits.target == label)[:per_class]
        for i, index in enumerate(chosen):
            pixels = np.round(digits.images[index] * (255 / 16)).astype(np.uint8)
            write_png(root / f"digit{label}" / f"{i:03d}.png", pixels)
    return root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow first: `make test` hands them to two pytest-xdist workers one at a time in this order
    (--maxschedchunk 1), so the minute-long ones start at once and the many quick ones fill the gaps at the end
    (no worker left alone with a long test while the other is idle)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A tmp cwd for subprocess runs: a copy of params.yaml, no outputs yet."""
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    return tmp_path


@pytest.fixture
def cli(capsys):
    """In-process `pipeline.cli.main(argv)` -> (exit code, stdout, stderr); restores the SIGTERM handler."""
    from pipeline.cli import main

    previous = signal.getsignal(signal.SIGTERM)

    def invoke(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        finally:
            signal.signal(signal.SIGTERM, previous)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Config, dict]:
    """The stages once, in process, on the tiny config: (root, cfg, results by stage)."""
    root = tmp_path_factory.mktemp("tiny-run")
    cfg = tiny_config(root)
    return root, cfg, run_stages(cfg)


def write_photo(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB", seed: int = 0, **save) -> Path:
    """A real image file of `size` (width, height) in Pillow `mode`, format from the suffix (noise pixels).

    Modes with a palette or alpha get one (P: 16 colours; RGBA/LA: alpha varies). `save` goes to
    Image.save, e.g. exif=... or quality=...
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "P":
        image = rgb.quantize(16)
    elif mode in ("RGBA", "LA"):
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        image = rgb.convert(mode[:-1])
        image.putalpha(alpha)
    else:
        image = rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path
