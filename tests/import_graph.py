"""The project's import graph, read from the source (no module is imported): which
`components` modules each module imports, at top level or inside functions.

Used by the architecture test (layers) and the DVC test (a stage's code deps cover every
module its step runs).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "components"


@cache
def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__)."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imported_names(path: Path, module_level: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@cache
def imports(module: str, module_level: bool = False) -> frozenset[str]:
    """The project modules `module` imports directly (`module_level`: only those its
    body imports when it is loaded, not those imported inside its functions)."""
    known = modules()
    names = _imported_names(known[module], module_level)
    return frozenset(name for name in names if name in known) - {module}


@cache
def external_imports(module: str) -> frozenset[str]:
    """Top-level names of the other packages `module` imports."""
    names = _imported_names(modules()[module])
    return frozenset(name.split(".")[0] for name in names if name.split(".")[0] != PACKAGE)


def closure(*roots: str, loaded_only: frozenset[str] = frozenset()) -> set[str]:
    """Every project module that importing `roots` can import, `roots` included, with the
    packages above each (importing a submodule runs its package's __init__). Of the
    modules in `loaded_only`, only what their body imports is followed."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(imports(module, module_level=module in loaded_only))
        parent = module.rpartition(".")[0]
        if parent:
            todo.append(parent)
    return seen
