"""What a stage's process runs, read from the source: the repo modules it imports and the config keys they read.

dvc.yaml's `deps:` and `params:` must cover both, or DVC (and the flows' stage cache, which keys stages
on the same lists) would call a stage "unchanged" after a change to code or config it runs with.
tests/unit/test_dvc_deps.py checks that they do; tests/integration/test_dvc_closure.py checks this
reading against the modules a real `dvc repro` imports and against `dvc status`.

Imports. `python -m pipeline <stage>` runs pipeline/__main__.py, then pipeline/cli.py, whose `main()`
calls `pipeline.stages.stage_runner(stage)`, which imports `pipeline.stages.<stage>` by name and runs it.
What runs is the union of two closures:
  - import time: from the entry modules and the stage module, following module-level imports only:
    every module whose top-level code runs. Lazy imports inside cli.py's functions are not followed:
    they serve other subcommands (Kubernetes rendering, the Prefect flow, predict).
  - run time (`stage_code`): from the code that runs the stage (the stage module, stage_runner's
    module, load_config's module), following every import, function-level ones included: a lazy import
    in the stage's code runs when the stage does.
Package `__init__.py` files count (importing `a.b.c` runs `a` and `a.b`); `if TYPE_CHECKING:` blocks do
not run and are skipped. Only files of this repo count: third-party packages are pinned by the lock.

Config reads. A `Config` is a name `cfg` or one annotated `Config`; aliases (`data = cfg.data`) are
followed. `cfg.a.b` reads key `a.b`; a section passed on whole (`fit(..., cfg.trainer)`), dumped
(`cfg.pretrain.model.model_dump()`) or aliased and passed on reads its whole subtree; `cfg.model_dump()`
reads everything; `cfg.fingerprint("seed", "data")` reads the sections it names. A bare `cfg` handed to
a function is read by that function's own module, which is in `stage_code` too (the only code cli.py
hands the config to is the stage's). Reads are per module: a module's reads count for every stage
whose `stage_code` holds it.

    python -m tests.stage_closure        # per stage: the files and config keys dvc.yaml must cover
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

from pydantic import BaseModel

from pipeline.config import Config

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_MODULES = ("pipeline/__main__.py", "pipeline/cli.py")
# Modules that import by computed name; the targets are roots of the closure (stage_runner -> the stage module).
DYNAMIC_IMPORTERS = {"pipeline/stages/__init__.py"}
CONFIG_METHODS_READING_ALL = ("model_dump", "model_dump_json", "model_copy")


# ---------------------------------------------------------------- imports


def _module_file(root: Path, dotted: str) -> str | None:
    """`pipeline.data.shards` -> `pipeline/data/shards.py` (or a package's __init__.py), if it is in this repo."""
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(root).as_posix()
    return None


def _module_name(path: str) -> str:
    parts = path[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _walk(tree: ast.AST, module_level_only: bool):
    """ast.walk minus `if TYPE_CHECKING:` bodies and, if asked, function bodies (they run only when called)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                stack.extend(child.decorator_list if not isinstance(child, ast.Lambda) else [])
                continue
            stack.append(child)


@functools.lru_cache(maxsize=None)
def _parse(file: Path, mtime_ns: int, size: int) -> ast.Module:
    return ast.parse(file.read_text(), filename=str(file))


def _parse_file(root: Path, path: str) -> ast.Module:
    file = root / path
    stat = file.stat()
    return _parse(file, stat.st_mtime_ns, stat.st_size)


def imports_of(root: Path, path: str, module_level_only: bool = False) -> set[str]:
    """Repo files that importing (and running) `path` imports: modules and the packages above them."""
    package = _module_name(path) if path.endswith("__init__.py") else _module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in _walk(_parse_file(root, path), module_level_only):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    found = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            file = _module_file(root, ".".join(parts[:i]))
            if file:
                found.add(file)
    return found


def dynamic_imports(root: Path, path: str) -> list[int]:
    """Lines of `importlib.import_module(...)` / `__import__(...)` calls: imports the AST cannot follow."""
    lines = []
    for node in ast.walk(_parse_file(root, path)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                lines.append(node.lineno)
    return lines


def _package_inits(root: Path, path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return [f for i in range(1, len(parts) + 1) if (f := _module_file(root, ".".join(parts[:i])))]


def _closure(root: Path, starts: list[str], module_level_only: bool) -> set[str]:
    seen: set[str] = set()
    todo = [*starts, *(p for s in starts for p in _package_inits(root, s))]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += imports_of(root, path, module_level_only)
    return seen


def run_roots(stage: str) -> list[str]:
    """The modules whose functions run the stage: the stage module, stage_runner's, load_config's."""
    return [f"pipeline/stages/{stage}.py", "pipeline/stages/__init__.py", "pipeline/config.py"]


def stage_code(stage: str, root: Path = REPO_ROOT) -> set[str]:
    """The code that runs the stage: its module and everything that imports, at any level."""
    return _closure(root, run_roots(stage), module_level_only=False)


def stage_closure(stage: str, root: Path = REPO_ROOT) -> set[str]:
    """Every repo file `python -m pipeline <stage>` imports, as repo-relative paths.

    The import-time closure (module-level imports only, from the entry modules and the stage module:
    the code that runs on import) plus `stage_code` (the stage's own code, lazy imports included).
    """
    imported = _closure(root, [*ENTRY_MODULES, f"pipeline/stages/{stage}.py"], module_level_only=True)
    return imported | stage_code(stage, root)


# ---------------------------------------------------------------- config reads


def _section_type(path: tuple[str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in path:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _annotated_config(arg: ast.arg) -> bool | None:
    """True: annotated Config; False: annotated something else; None: not annotated."""
    if arg.annotation is None:
        return None
    text = ast.unparse(arg.annotation).strip("'\"")
    return text in ("Config", "pipeline.config.Config")


class _ConfigReads:
    """Collects dotted config keys read in one module: key -> lines ('' is the whole config)."""

    def __init__(self) -> None:
        self.reads: dict[str, set[int]] = {}
        self.parents: dict[ast.AST, ast.AST] = {}

    def scan(self, tree: ast.Module) -> dict[str, set[int]]:
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
        self._scope(tree.body, {"cfg": ()})
        return self.reads

    def _resolve(self, node: ast.AST, scope: dict) -> tuple[str, ...] | None:
        if isinstance(node, ast.Name):
            return scope.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._resolve(node.value, scope)
            model = _section_type(base) if base is not None else None
            if model is not None and node.attr in model.model_fields:
                return (*base, node.attr)
        return None

    def _record(self, path: tuple[str, ...], line: int) -> None:
        self.reads.setdefault(".".join(path), set()).add(line)

    def _scope(self, body: list[ast.stmt], inherited: dict) -> None:
        scope = dict(inherited)
        nested: list[ast.AST] = []
        nodes: list[ast.AST] = []
        stack = list(body)
        while stack:  # this scope's nodes; nested functions get their own scope
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                nested.append(node)
                continue
            nodes.append(node)
            stack.extend(ast.iter_child_nodes(node))
        for node in nodes:  # aliases: `data = cfg.data`
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                path = self._resolve(node.value, scope)
                if path:
                    scope[node.targets[0].id] = path
        for node in nodes:
            if not isinstance(node, (ast.Name, ast.Attribute)) or isinstance(node.ctx, ast.Store):
                continue
            path = self._resolve(node, scope)
            parent = self.parents.get(node)
            if path is None or (parent is not None and self._resolve(parent, scope) is not None):
                continue  # not config, or not the longest chain
            if isinstance(parent, ast.Assign) and parent.value is node and path:
                continue  # an alias: its uses are the reads
            if path:
                self._record(path, node.lineno)  # a key, or a section used whole
            elif isinstance(parent, ast.Attribute):  # a method of the root Config
                call = self.parents.get(parent)
                if parent.attr == "fingerprint" and isinstance(call, ast.Call):
                    for arg in call.args:
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                            self._record((arg.value,), node.lineno)
                elif parent.attr in CONFIG_METHODS_READING_ALL:
                    self._record((), node.lineno)
            # a bare root handed to a function: that function's module reads it (it is in the closure)
        for function in nested:
            inner = dict(scope)
            args = function.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is None:
                    continue
                kind = _annotated_config(arg)
                if kind or (kind is None and arg.arg == "cfg"):
                    inner[arg.arg] = ()
                else:
                    inner.pop(arg.arg, None)  # shadowed by a parameter that is not a Config
            self._scope(function.body if isinstance(function.body, list) else [function.body], inner)


def config_reads(path: str, root: Path = REPO_ROOT) -> dict[str, set[int]]:
    """Dotted config keys (or sections: their whole subtree) that code in `path` reads -> line numbers."""
    return _ConfigReads().scan(_parse_file(root, path))


def config_leaves(node: dict | None = None, prefix: str = "") -> list[str]:
    """Every leaf key of the config (lists are values), dotted: `pretrain.model.blocks`, `seed`, ..."""
    node = Config().model_dump() if node is None else node
    leaves = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            leaves += config_leaves(value, f"{prefix}{key}.")
        else:
            leaves.append(prefix + key)
    return leaves


def leaves_under(key: str) -> list[str]:
    return [leaf for leaf in config_leaves() if not key or leaf == key or leaf.startswith(key + ".")]


def key_covered(key: str, params: list[str]) -> bool:
    """Is dotted config `key` tracked by one of a stage's `params:` (the key itself or a section above it)?"""
    return any(key == entry or key.startswith(entry + ".") for entry in params)


def file_covered(path: str, deps: list[str]) -> bool:
    """Is repo file `path` tracked by one of a stage's `deps:` (the file itself or a folder above it)?"""
    return any(path == dep.rstrip("/") or path.startswith(dep.rstrip("/") + "/") for dep in deps)


if __name__ == "__main__":
    from pipeline.stages import STAGES

    for name in STAGES:
        files = sorted(stage_closure(name))
        keys = sorted({k for f in stage_code(name) for k in config_reads(f)})
        print(f"{name}:\n  files: {' '.join(files)}\n  config: {' '.join(k or '<all>' for k in keys)}")
