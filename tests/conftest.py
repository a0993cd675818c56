"""Shared helpers for the pipeline tests: tiny configs, isolated output roots, CLI runners.

Tests never write into the repository's data/, models/, reports/ or checkpoints/: in-process
runs point `paths.root` at a tmp folder; subprocess runs use a tmp cwd holding a copy of
params.yaml.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config, load_config
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
