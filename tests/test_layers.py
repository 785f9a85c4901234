"""The package's structure: imports only go down the floors, and no module imports itself back
through others. Every import counts, at module level or inside a function (a lazy import is still
a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dist_ssl"

# Lowest first. A module may import from its own floor or any floor below.
FLOORS = [
    {"errors", "files"},
    {"config"},
    {"data", "models", "methods"},
    {"engine"},
    {"inference"},
    {"report", "pipeline", "demo", "bench"},
    {"cli", "__main__"},
]
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The dist_ssl modules `path` imports, resolved to the module files that exist."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from dist_ssl.data import shards` names a module; `from dist_ssl.x import y` names x
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            if not name.startswith("dist_ssl"):
                continue
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "dist_ssl":
                found.add(name)
    found.discard(_module_name(path))
    return found


def _floor(module: str) -> int:
    room = module.split(".")[1]
    for level, rooms in enumerate(FLOORS):
        if room in rooms:
            return level
    raise AssertionError(f"{module}: its room '{room}' is on no floor of tests/test_layers.py (add it)")


def test_imports_only_go_down():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        if name == "dist_ssl":
            continue
        for target in _imports(path, modules):
            if target != "dist_ssl" and _floor(target) > _floor(name):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports up a floor: " + ", ".join(sorted(upward))


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(circles)


def test_no_module_over_600_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"
