"""Typed config: overrides, aliases, validation that lists every problem, shipped files load."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import Config, FinetuneConfig, PathsConfig, TrainerConfig
from pipeline.params import apply_overrides, build_config, load_config, parse_override, read_params
from pipeline.errors import ConfigError
from tests.conftest import PARAMS, REPO_ROOT


# ---------------------------------------------------------------- shipped files


def test_shipped_params_yaml_validates_and_sets_every_section():
    raw = read_params(PARAMS)
    assert {"data", "pretrain", "finetune", "evaluate"} <= set(raw)
    cfg = build_config(raw)
    assert cfg.data.source == "builtin:digits"
    assert cfg.trainer.accelerator == "cpu"  # CPU defaults: `make run` works anywhere


def test_every_shipped_params_file_validates():
    """Every params file the repository ships (tracked by git: not a run's outputs such as the params.yaml
    DVCLive writes beside its curves under runs/, which `make run` then `make test` would otherwise meet)."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    shipped = [REPO_ROOT / name for name in tracked if not name.startswith("tests/")
               and Path(name).name.startswith("params") and name.endswith((".yaml", ".yml"))]
    assert PARAMS in shipped
    for path in shipped:
        load_config(path)


def test_params_yaml_sets_keys_the_code_knows():
    """params.yaml never relies on a default that differs from what it says (no silently ignored keys)."""
    raw = read_params(PARAMS)
    dumped = build_config(raw).model_dump(mode="json")

    def check(section: dict, effective: dict, prefix: str) -> None:
        for key, value in section.items():
            if isinstance(value, dict):
                check(value, effective[key], f"{prefix}{key}.")
            elif key == "precision":
                assert effective[key] == "32-true"
            else:
                assert effective[key] == value, f"{prefix}{key}"

    check(raw, dumped, "")


def test_dvc_yaml_params_keys_exist_in_config():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    dumped = Config().model_dump()
    keys = [key for stage in stages.values() for key in stage.get("params", []) if isinstance(key, str)]
    assert keys, "dvc.yaml stages declare their params"
    for key in keys:
        node = dumped
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"dvc.yaml param {key!r} is not a config key"
            node = node[part]


def test_every_leaf_field_has_a_docstring():
    undocumented = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")
            elif not field.description:
                undocumented.append(prefix + name)

    walk(Config, "")
    assert undocumented == []


# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize("text, path, value", [
    ("finetune.labels_per_class=all", ["finetune", "labels_per_class"], "all"),
    ("finetune.labels_per_class=7", ["finetune", "labels_per_class"], 7),
    ("pretrain.optimizer.lr=3.0e-4", ["pretrain", "optimizer", "lr"], 3e-4),
    ("pretrain.optimizer.lr=0.5", ["pretrain", "optimizer", "lr"], 0.5),
    ("trainer.compile=true", ["trainer", "compile"], True),
    ("data.source=/data/pets", ["data", "source"], "/data/pets"),
    ("data.source=s3://bucket/prefix", ["data", "source"], "s3://bucket/prefix"),
    ("a.b=[1, 2]", ["a", "b"], [1, 2]),
    (" seed = 3", ["seed"], 3),
    ("data.source=", ["data", "source"], ""),
])
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


def test_yaml_1_1_exponent_without_dot_still_becomes_a_float():
    # PyYAML reads `3e-4` as a string (YAML 1.1); the typed config must still get a float.
    assert float(parse_override("x=3e-4")[1]) == 3e-4
    assert load_config(None, ["finetune.optimizer.lr=3e-4"]).finetune.optimizer.lr == pytest.approx(3e-4)


def test_overrides_reach_the_typed_config():
    cfg = load_config(PARAMS, ["finetune.labels_per_class=all", "pretrain.optimizer.lr=3e-4", "seed=7",
                               "trainer.precision=bf16"])
    assert cfg.finetune.labels_per_class == "all"
    assert cfg.pretrain.optimizer.lr == pytest.approx(3e-4)
    assert isinstance(cfg.pretrain.optimizer.lr, float)
    assert cfg.seed == 7
    assert cfg.trainer.precision == "bf16-mixed"


def test_override_creates_missing_sections():
    assert load_config(None, ["pretrain.optimizer.name=sgd"]).pretrain.optimizer.name == "sgd"


@pytest.mark.parametrize("bad, named", [
    ("seed", "--set 'seed'"), ("=3", "--set '=3'"), ("   =3", "--set '   =3'"), ("a.b=[unclosed", "--set a.b"),
])
def test_bad_override_syntax_is_a_config_error(bad, named):
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, [bad])
    assert named in err.value.render()


def test_override_through_a_value_names_the_key():
    with pytest.raises(ConfigError) as err:
        apply_overrides({"seed": 3}, ["seed.x=1"])
    assert "seed.x" in err.value.render()


def test_all_bad_overrides_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, ["nokey", "also_bad"])
    assert len(err.value.problems) == 2


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("value, expected", [
    (32, "32-true"), ("32", "32-true"), (16, "16-mixed"), ("bf16", "bf16-mixed"),
    ("bf16-mixed", "bf16-mixed"), ("16-mixed", "16-mixed"), ("32-true", "32-true"),
])
def test_precision_aliases(value, expected):
    assert TrainerConfig(precision=value).precision == expected


def test_unknown_precision_rejected():
    with pytest.raises(ConfigError) as err:
        build_config({"trainer": {"precision": "8-bit"}})
    assert "trainer.precision" in err.value.render()


def test_every_problem_listed_at_once_with_its_key():
    raw = read_params(PARAMS)
    raw["pretrain"]["learning_rate"] = 0.1  # unknown key (a typo of optimizer.lr)
    raw["finetune"]["epochs"] = "many"  # wrong type
    raw["finetune"]["optimizer"]["lr"] = -0.01  # out of range
    raw["data"]["val_fraction"] = 0.9  # out of range
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    text = err.value.render()
    for key in ("pretrain.learning_rate", "finetune.epochs", "finetune.optimizer.lr", "data.val_fraction"):
        assert key in text
    assert "unknown key" in text
    assert len(err.value.problems) >= 4
    assert text.startswith(f"{len(err.value.problems)} configuration problem(s):")


def test_unknown_top_level_section_rejected():
    with pytest.raises(ConfigError) as err:
        build_config({"pretrian": {"epochs": 1}})
    assert "pretrian: unknown key" in err.value.problems


@pytest.mark.parametrize("labels, ok", [(1, True), (20, True), ("all", True), (0, False), (-3, False), ("some", False)])
def test_labels_per_class(labels, ok):
    if ok:
        assert FinetuneConfig(labels_per_class=labels).labels_per_class == labels
    else:
        with pytest.raises(ConfigError) as err:
            build_config({"finetune": {"labels_per_class": labels}})
        assert "labels_per_class" in err.value.render()


def test_freeze_epochs_must_leave_unfrozen_epochs():
    with pytest.raises(ConfigError) as err:
        build_config({"finetune": {"epochs": 3, "freeze_backbone_epochs": 3}})
    assert "freeze_backbone_epochs" in err.value.render()


def test_params_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        read_params(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_params(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_params(tmp_path / "broken.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == Config()


# ---------------------------------------------------------------- fingerprint and paths


def test_fingerprint_changes_only_with_its_sections():
    base = load_config(PARAMS)
    assert base.fingerprint("pretrain") == load_config(PARAMS).fingerprint("pretrain")
    lr = load_config(PARAMS, ["pretrain.optimizer.lr=0.001"])
    assert lr.fingerprint("pretrain") != base.fingerprint("pretrain")
    assert lr.fingerprint("finetune") == base.fingerprint("finetune")
    seed = load_config(PARAMS, ["seed=1"])
    assert seed.fingerprint("seed", "pretrain") != base.fingerprint("seed", "pretrain")
    assert len(base.fingerprint("pretrain")) == 12


def test_paths_uri_joins_root():
    paths = PathsConfig()
    assert paths.uri("prepared") == "data/prepared"
    assert PathsConfig(root="/tmp/run").uri("prepared") == "/tmp/run/data/prepared"
    assert PathsConfig(root="s3://bucket/prefix/").uri("reports") == "s3://bucket/prefix/reports"
    assert PathsConfig(root="s3://bucket/x", pretrain="/abs/pretrain").uri("pretrain") == "/abs/pretrain"
    assert PathsConfig(root="/tmp/run", release="s3://b/release").uri("release") == "s3://b/release"
    assert PathsConfig(root="").uri("checkpoints") == "checkpoints"


@pytest.mark.parametrize("settings, strategy", [
    ({"trainer.devices": 2}, "ddp"), ({"trainer.num_nodes": 2}, "ddp"), ({}, "auto"),
    ({"trainer.devices": 2, "trainer.strategy": "fsdp"}, "fsdp"), ({"trainer.strategy": "ddp"}, "ddp"),
])
def test_more_than_one_device_means_ddp_unless_a_strategy_is_named(settings, strategy):
    cfg = load_config(PARAMS, [f"{key}={value}" for key, value in settings.items()])
    assert cfg.trainer.strategy == strategy


def test_a_params_file_is_read_from_a_uri_as_from_a_path(tmp_path):
    """Stage pods get the run's params file as `--params <uri>` (on S3 there; any fsspec URI reads the same)."""
    from pipeline.errors import ConfigError

    copy = tmp_path / "params.yaml"
    copy.write_text(PARAMS.read_text())
    assert load_config(f"file://{copy}", ["seed=7"]) == load_config(copy, ["seed=7"])
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(f"file://{tmp_path / 'missing.yaml'}")
