"""The CLI: exit codes (0 / 2 naming every key, file or folder), no partial outputs, real subprocess runs."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import PARAMS, PYTHON, TINY, make_image_folder, run_cli, sets, write_png


def _tiny(root: Path, *extra: str) -> list[str]:
    return ["--params", str(PARAMS), *sets([*TINY, f"paths.root={root}", *extra])]


def _bad_params(tmp_path: Path) -> Path:
    raw = yaml.safe_load(PARAMS.read_text())
    raw["pretrain"]["learning_rate"] = 0.01  # unknown key
    raw["pretrain"]["epochs"] = "ten"  # wrong type
    raw["finetune"]["optimizer"]["lr"] = -0.001  # out of range
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------- bad configuration: exit 2, every key named


def test_bad_params_list_every_key_and_compute_nothing(cli, tmp_path):
    params = _bad_params(tmp_path)
    code, out, err = cli("pretrain", "--params", str(params), "--set", f"paths.root={tmp_path}")
    assert code == 2
    assert "3 configuration problem(s)" in err
    assert "pretrain.learning_rate: unknown key" in err
    assert "pretrain.epochs" in err and "'ten'" in err
    assert "finetune.optimizer.lr" in err and "-0.001" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing computed, nothing written


def test_bad_overrides_exit_2(cli, tmp_path):
    code, _, err = cli("prepare", "--params", str(PARAMS), "--set", "seed", "--set", "trainer.devices=0",
                       "--set", "finetune.labels_per_class=none")
    assert code == 2
    assert "--set 'seed': expected key.path=value" in err
    code, _, err = cli("prepare", "--params", str(PARAMS), "--set", "trainer.devices=0",
                       "--set", "finetune.labels_per_class=none", "--set", "pretrain.optimizer.lr=-1",
                       "--set", f"paths.root={tmp_path}")
    assert code == 2
    for key in ("trainer.devices", "finetune.labels_per_class", "pretrain.optimizer.lr"):
        assert key in err
    assert list(tmp_path.iterdir()) == []


def test_missing_params_file_exit_2(cli, tmp_path):
    code, _, err = cli("prepare", "--params", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: params file not found" in err


def test_unknown_command_is_a_usage_error(cli):
    with pytest.raises(SystemExit) as exit_:
        cli("no-such-stage")
    assert exit_.value.code == 2


def test_show_config_prints_effective_values(cli):
    code, out, _ = cli("show-config", "--params", str(PARAMS), "--set", "finetune.labels_per_class=all",
                       "--set", "trainer.precision=16")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["finetune"]["labels_per_class"] == "all"
    assert shown["trainer"]["precision"] == "16-mixed"
    assert shown["pretrain"]["optimizer"]["name"] == "adamw"


# ---------------------------------------------------------------- bad data: exit 2, file or folder named, nothing written


def _corrupt(root: Path) -> str:
    (root / "digit1" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return f"{root}/digit1/002.png"


def _empty_class(root: Path) -> str:
    (root / "digit9").mkdir()
    return f"{root}/digit9: empty class folder"


def _too_small(root: Path) -> str:
    write_png(root / "digit0" / "tiny.png", np.zeros((4, 6), dtype=np.uint8))  # below data.min_image_size
    return f"{root}/digit0/tiny.png"


def _loose_image(root: Path) -> str:
    write_png(root / "loose.png", np.zeros((8, 8), dtype=np.uint8))
    return "loose.png"


def _missing(root: Path) -> str:
    shutil.rmtree(root)
    return f"{root} does not exist"


@pytest.mark.parametrize("damage", [_corrupt, _empty_class, _too_small, _loose_image, _missing],
                         ids=["corrupt-image", "empty-class", "too-small", "loose-image", "missing-path"])
def test_bad_data_exit_2_naming_it_and_writing_nothing(cli, tmp_path, damage):
    source = make_image_folder(tmp_path / "images", classes=2, per_class=4)
    expected = damage(source)
    run_root = tmp_path / "run"
    code, _, err = cli("prepare", *_tiny(run_root, f"data.source={source}"))
    assert code == 2, err
    assert "data problem(s)" in err and expected in err
    assert not (run_root / "data" / "prepared").exists()
    assert not run_root.exists() or not any((run_root / "data").iterdir())  # no staging leftovers


def test_bad_data_leaves_previous_prepared_output_untouched(cli, tmp_path):
    source = make_image_folder(tmp_path / "images", classes=2, per_class=4)
    run_root = tmp_path / "run"
    code, _, err = cli("prepare", *_tiny(run_root, f"data.source={source}"))
    assert code == 0, err
    prepared = run_root / "data" / "prepared"
    before = {str(p): p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    _corrupt(source)
    _empty_class(source)
    code, _, err = cli("prepare", *_tiny(run_root, f"data.source={source}"))
    assert code == 2
    assert "2 data problem(s)" in err and "digit1/002.png" in err and "digit9" in err
    assert {str(p): p.read_bytes() for p in prepared.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in prepared.parent.iterdir()) == ["prepared"]


def test_downstream_stage_without_upstream_output_exit_2(cli, tmp_path):
    code, _, err = cli("evaluate", *_tiny(tmp_path))
    assert code == 2 and "run `pipeline prepare` first" in err


# ---------------------------------------------------------------- real subprocesses
# (tests/integration/test_dvc.py runs all four stages through `python -m pipeline` with default paths)


@pytest.mark.slow
def test_subprocess_exit_codes(workdir):
    bad = run_cli(["prepare", "--set", "pretrain.optimizer.lr=-1", "--set", "nosuch.key=1"], cwd=workdir)
    assert bad.returncode == 2
    assert "pretrain.optimizer.lr" in bad.stderr and "nosuch: unknown key" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["params.yaml"]


@pytest.mark.slow
def test_console_script(workdir):
    script = Path(PYTHON).parent / "pipeline"
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    import subprocess

    from tests.conftest import subprocess_env

    done = subprocess.run([str(script), "show-config", "--set", "seed=5"], cwd=workdir, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["seed"] == 5
