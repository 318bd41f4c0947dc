"""kdtune's modules form layers and nothing imports upward: the core (models, data, distiller, trainer
...) < ``kdtune.build`` (models, data and distiller of a config) < the methods (``kdtune.search``,
``kdtune.selfdistill``) < ``kdtune.recipes`` (one recipe per method) < ``kdtune.recipe`` (``run``) <
the entry points (CLI, quickstart). Every import counts, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import kdtune

PACKAGE = Path(kdtune.__file__).parent

#: Lowest first; a module belongs to the last layer one of whose prefixes it starts with (else the core).
LAYERS = [
    ("build", ("kdtune.build",)),
    ("methods", ("kdtune.search", "kdtune.selfdistill")),
    ("recipes", ("kdtune.recipes",)),
    ("recipe", ("kdtune.recipe",)),
    ("entry points", ("kdtune.cli", "kdtune.quickstart")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    """0 for the core, else 1 + the index in :data:`LAYERS`."""
    level = 0
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            level = i + 1
    return level


def layer_name(level: int) -> str:
    return "core" if level == 0 else LAYERS[level - 1][0]


def imports(module: str) -> list[tuple[str, int]]:
    """(imported kdtune module, line) for every import statement of ``module``, wherever it is."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            out.append((base, node.lineno))
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names if f"{base}.{alias.name}" in MODULES]
    return [(name, line) for name, line in out if name == "kdtune" or name.startswith("kdtune.")]


def upward_imports() -> list[str]:
    found = []
    for module in MODULES:
        for target, line in imports(module):
            if layer(target) > layer(module):
                found.append(f"{module} ({layer_name(layer(module))}) imports {target} "
                             f"({layer_name(layer(target))}) at line {line}")
    return found


def test_no_module_imports_a_higher_layer():
    assert upward_imports() == []


def test_methods_import_neither_the_recipes_nor_the_cli():
    methods = [m for m in MODULES if layer(m) == 2]
    assert "kdtune.search.weights" in methods and "kdtune.selfdistill.build" in methods
    bad = [(m, target) for m in methods for target, _ in imports(m)
           if target.split(".")[:2] in (["kdtune", "recipe"], ["kdtune", "recipes"], ["kdtune", "cli"])]
    assert bad == []


def test_the_checker_sees_imports_inside_functions(tmp_path, monkeypatch):
    """A function-level upward import (how the cycle recipe -> search -> recipe used to hide) is found."""
    fake = tmp_path / "kdtune" / "search" / "sneaky.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from kdtune.recipe import prepare\n    from . import weights\n")
    monkeypatch.setitem(MODULES, "kdtune.search.sneaky", fake)
    assert imports("kdtune.search.sneaky") == [("kdtune.recipe", 2), ("kdtune.search", 3),
                                               ("kdtune.search.weights", 3)]
    assert "kdtune.search.sneaky (methods) imports kdtune.recipe (recipe) at line 2" in upward_imports()
