"""dvc.yaml cannot lie: each stage depends on every repo module its process imports and on every config
key its code reads, and params.yaml spells out every config key (so DVC tracks the effective config).

The closure and the config reads are computed from the source by tests/stage_closure.py (its docstring
has the rules); tests/integration/test_dvc_closure.py checks them against a real `dvc repro`.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config
from pipeline.stages import STAGES
from tests.stage_closure import (
    DYNAMIC_IMPORTERS, REPO_ROOT, config_leaves, config_reads, dynamic_imports, file_covered, key_covered,
    leaves_under, stage_closure, stage_code,
)

# Config reads that do not shape a stage's outputs, each with its reason: (stage, module, key), "*" for any.
# Everything else a stage reads must be covered by its `params:`.
NOT_PARAMS = {
    ("*", "*", "paths"): "where outputs go, not what they hold: DVC tracks the outputs themselves (and the "
                         "flows' stage cache keys each output location by content)",
    ("*", "pipeline/stages/__init__.py", "data.source"): "stage_runner's bucket pre-check before any compute",
    ("*", "pipeline/stages/__init__.py", "pretrain.source"): "stage_runner's bucket pre-check before any compute",
    ("prepare", "pipeline/data/sources.py", "pretrain.glyphs_per_class"):
        "read by sources._glyphs, which scan_source calls for kind 'corpus' only (builtin:glyphs is no target)",
}


def _stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _entries(items) -> list[str]:
    return [item if isinstance(item, str) else next(iter(item)) for item in items or []]


def _outputs(stages: dict) -> set[str]:
    return {out for stage in stages.values() for kind in ("outs", "metrics", "plots") for out in _entries(stage.get(kind))}


def missing_deps(stages: dict, name: str, root: Path = REPO_ROOT) -> list[str]:
    deps = _entries(stages[name].get("deps"))
    return [f"stage {name!r} imports {path} but dvc.yaml does not list it: add `- {path}` to stages.{name}.deps"
            for path in sorted(stage_closure(name, root)) if not file_covered(path, deps)]


def missing_params(stages: dict, name: str, root: Path = REPO_ROOT) -> list[str]:
    params = _entries(stages[name].get("params"))
    problems = []
    for module in sorted(stage_code(name, root)):
        for key, lines in sorted(config_reads(module, root).items()):
            for leaf in leaves_under(key):
                exempt = any(s in ("*", name) and m in ("*", module) and (leaf == k or leaf.startswith(k + "."))
                             for s, m, k in NOT_PARAMS)
                if not exempt and not key_covered(leaf, params):
                    where = f"{module}:{min(lines)}" + (f" (reads {key or 'the whole config'})" if key != leaf else "")
                    problems.append(f"stage {name!r} reads config key {leaf} ({where}) but dvc.yaml does not list "
                                    f"it: add `- {leaf}` (or its section) to stages.{name}.params")
    return list(dict.fromkeys(problems))


# ---------------------------------------------------------------- code deps


@pytest.mark.parametrize("stage", STAGES)
def test_every_module_a_stage_imports_is_a_dep(stage):
    assert missing_deps(_stages(), stage) == []


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_modules_the_stage_imports(stage):
    """No stale code deps: a module the stage no longer imports only re-runs it for nothing."""
    stages = _stages()
    closure = stage_closure(stage)
    stale = []
    for dep in _entries(stages[stage].get("deps")):
        if dep in _outputs(stages):
            continue
        path = REPO_ROOT / dep
        assert path.exists(), f"stage {stage!r}: dep {dep} does not exist"
        if path.is_dir() and not any(file_covered(f, [dep]) for f in closure):
            stale.append(f"stage {stage!r}: dep {dep}/ holds no module it imports; remove it")
        elif path.suffix == ".py" and dep not in closure:
            stale.append(f"stage {stage!r}: dep {dep} is not imported by the stage; remove it")
    assert stale == []


def test_the_closure_sees_every_import():
    """Imports by computed name are invisible to the AST; only stage_runner's (of the stage module) is known."""
    unseen = [f"{path}:{line}: imports by computed name; make its targets roots in tests/stage_closure.py"
              for path in sorted(set().union(*(stage_closure(s) for s in STAGES)) - DYNAMIC_IMPORTERS)
              for line in dynamic_imports(REPO_ROOT, path)]
    assert unseen == []


def test_a_missing_dep_is_named_with_its_stage():
    stages = _stages()
    stages["pretrain"]["deps"].remove("pipeline/data/stream.py")
    stages["corpus"]["deps"].remove("pipeline/data/glyphs.py")
    assert missing_deps(stages, "pretrain") == [
        "stage 'pretrain' imports pipeline/data/stream.py but dvc.yaml does not list it: "
        "add `- pipeline/data/stream.py` to stages.pretrain.deps"]
    assert [p.split(" but")[0] for p in missing_deps(stages, "corpus")] == ["stage 'corpus' imports pipeline/data/glyphs.py"]
    stages["corpus"]["deps"].append("pipeline/data")  # a folder covers what is under it
    assert missing_deps(stages, "corpus") == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


def test_closure_rules(tmp_path):
    """Entry modules count module-level imports only; the stage's own code counts lazy and relative ones too."""
    _write(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/__main__.py": "from pipeline.cli import main\n",
        "pipeline/cli.py": """
            from pipeline import entry_dep
            def other_subcommand():
                from pipeline import launch_only
            """,
        "pipeline/entry_dep.py": "def f():\n    from pipeline import entry_lazy\n",
        "pipeline/entry_lazy.py": "",
        "pipeline/launch_only.py": "",
        "pipeline/config.py": "",
        "pipeline/stages/__init__.py": "",
        "pipeline/stages/one.py": """
            from typing import TYPE_CHECKING
            from ..util import helper
            import numpy
            if TYPE_CHECKING:
                from pipeline import typing_only
            def run(cfg):
                import pipeline.sub.deep
            """,
        "pipeline/util.py": "",
        "pipeline/typing_only.py": "",
        "pipeline/sub/__init__.py": "",
        "pipeline/sub/deep.py": "",
    })
    assert stage_closure("one", tmp_path) == {
        "pipeline/__init__.py", "pipeline/__main__.py", "pipeline/cli.py", "pipeline/entry_dep.py", "pipeline/config.py",
        "pipeline/stages/__init__.py", "pipeline/stages/one.py", "pipeline/util.py", "pipeline/sub/__init__.py",
        "pipeline/sub/deep.py",
    }


# ---------------------------------------------------------------- config


def _leaves(node: dict, prefix: str = "") -> set[str]:
    return set(config_leaves(node, prefix))


def test_params_yaml_spells_out_every_config_key():
    """What DVC tracks is params.yaml: a default that only config.py knows would change no stage."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    defaults = Config().model_dump(mode="json")
    missing = [f"params.yaml lacks {key} (config.py's default: {_value(defaults, key)!r}); add it so DVC tracks it"
               for key in config_leaves() if key not in _leaves(raw)]
    assert missing == []


def _value(node: dict, key: str):
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("stage", STAGES)
def test_every_config_key_a_stage_reads_is_a_param(stage):
    assert missing_params(_stages(), stage) == []


def test_a_missing_param_is_named_with_its_stage_and_where_it_is_read():
    stages = _stages()
    stages["corpus"]["params"].remove("data.num_workers")
    assert missing_params(stages, "corpus") == [
        "stage 'corpus' reads config key data.num_workers (pipeline/data/ingest.py:71) but dvc.yaml does not "
        "list it: add `- data.num_workers` (or its section) to stages.corpus.params"]


def test_config_read_rules(tmp_path):
    _write(tmp_path, {"m.py": """
        from pipeline.config import Config, OptimizerConfig

        def stage(cfg: Config):
            data = cfg.data
            use(data.source, cfg.pretrain.model.width)   # keys, also through an alias
            fit(cfg.trainer)                              # a section passed on: all of it
            cfg.finetune.optimizer.model_dump()           # a section dumped: all of it
            cfg.paths.uri("prepared")
            key = cfg.fingerprint("seed", "evaluate")
            helper(cfg)                                   # read in helper's module
            return lambda: data.image_size

        def whole(config: Config):
            return config.model_dump()

        def optimizer(cfg: OptimizerConfig):              # another `cfg`: not the Config
            return cfg.lr
        """})
    reads = config_reads("m.py", tmp_path)
    assert set(reads) == {"data.source", "pretrain.model.width", "trainer", "finetune.optimizer", "paths", "seed",
                          "evaluate", "data.image_size", ""}
    assert reads["data.source"] == {6}
