"""The package's shape (ARCHITECTURE.md): at most 12 modules at the top level, no module importing more than
12 of the package's modules, no import circle, and the subpackages in layers where none imports a layer
above it. Read from the source (`ast`): the imports a module runs when it is imported. Imports inside a
function are late look-ups and are listed apart: config.py checks a name against the registry that
selects it (models, optimizers, schedules, augmentation policies) where it checks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "resnest_train"

# Lower first: a module may import its own layer and the layers below it.
LAYERS = [{"errors"}, {"models"}, {"config", "config_yaml"}, {"cluster"}, {"recipe"}, {"data"}, {"checkpoint"},
          {"run"}, {"labels", "evaluation"}, {"cli"}]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports (`from resnest_train.x import y` counts x.y when that is a module)."""
    found = set()
    for node in _module_level(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resnest_train"):
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("resnest_train"))
    own = module_name(path)
    return {name for name in found if name in modules and name != own}


def _module_level(tree: ast.Module):
    """The statements a module runs at import: its body, into `if`/`try` blocks, not into functions or
    classes, nor into `if TYPE_CHECKING:`."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body]


LATE_LOOKUPS = {"resnest_train.config"}  # modules whose function-level imports reach upward, on purpose


def function_level_upward() -> list[tuple[str, str]]:
    """Function-level imports that reach a layer above their module, outside `LATE_LOOKUPS`."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    found = []
    for path in paths:
        name = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules and layer(node.module) > layer(name) >= 0:
                found.append((name, node.module))
    return sorted({pair for pair in found if pair[0] not in LATE_LOOKUPS})


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports(path, modules) for path in paths}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(LAYERS) if top in names) if top else -1


def test_at_most_12_modules_at_the_top_level():
    top = [path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py"]
    assert len(top) <= 12, sorted(top)


def test_no_module_imports_more_than_12_package_modules():
    heavy = {name: len(deps) for name, deps in graph().items() if len(deps) > 12}
    assert heavy == {}, heavy


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(edges.get(name, ())):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail[trail.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_no_subpackage_imports_a_layer_above_it():
    upward = [(name, dep) for name, deps in graph().items() for dep in deps
              if layer(name) >= 0 and layer(dep) > layer(name)]
    assert upward == [], upward


def test_late_lookups_upward_only_where_named():
    assert function_level_upward() == []


def test_every_module_architecture_names_exists():
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`(?:[a-z_]+/)*([a-z_]+\.py)", text))
    root = PACKAGE.parent
    existing = {path.name for folder in (PACKAGE, root / "tests", root / "scripts") for path in folder.rglob("*.py")}
    existing |= {path.name for path in root.glob("*.py")}
    assert named - existing == set()
    packages = set(re.findall(r"`([a-z_]+)/`", text))
    assert [name for name in packages if not (PACKAGE / name).is_dir() and not (root / name).is_dir()] == []
