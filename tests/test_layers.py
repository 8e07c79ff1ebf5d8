"""The layers, read from the code: every import of every module (those inside functions too).

``models`` (networks) is the lowest layer, then ``worker`` (slide → nuclei), then ``service``
(HTTP, queues, CLI). A module may import its own package and lower ones, never a higher one, and
no chain of imports between modules may lead back to where it started.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("models", "worker", "service")
"""Lowest first."""
MAX_LINES = 500


def modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The project modules ``name`` imports (``from a import b`` counts ``a.b`` when that is a
    module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: set(imported(name, path, known)) for name, path in found.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_no_module_imports_a_higher_layer() -> None:
    upward = sorted(f"{a} → {b}" for a, targets in graph().items() for b in targets
                    if layer(b) > layer(a))
    assert upward == []


def _parents(module: str) -> set[str]:
    """A package's ``__init__`` runs before any of its modules: importing ``a.b.c`` imports
    ``a`` and ``a.b`` first, which is not an edge of the code's own design."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycle() -> None:
    edges = {a: {b for b in targets if b not in _parents(a)} for a, targets in graph().items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert [" → ".join(c) for c in cycles] == []


def test_no_module_is_over_500_lines() -> None:
    long = sorted(f"{name}: {n}" for name, path in modules().items()
                  if (n := len(path.read_text().splitlines())) > MAX_LINES)
    assert long == []


def test_the_walk_sees_imports_inside_functions() -> None:
    """The checker itself: ``worker.pipeline`` imports ``worker.postprocess`` only inside
    functions today, and the walk must still see it."""
    assert any(t.startswith("worker.") for t in graph()["worker.pipeline"])
