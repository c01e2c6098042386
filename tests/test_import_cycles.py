"""No import cycles among fmbseg's modules: every import counts, lazy ones inside functions too
(only ``if TYPE_CHECKING:`` blocks are left out), so a cycle cannot hide behind a local import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fmbseg

PKG = Path(fmbseg.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = ("fmbseg", *path.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports (a package's ``__init__`` face excluded)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
        for n in ast.walk(node)
    }
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + [node.module] if node.module else base)
            found |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return {
        m
        for m in found
        if m in known
        and m != name
        and known[m].name != "__init__.py"
        and not name.startswith(m + ".")
    }


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    known = _modules()
    graph = {m: _imports(m, p, known) for m, p in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles() -> None:
    assert import_cycles() == []


def test_checker_sees_lazy_imports() -> None:
    # the walk must count an import inside a function: runner's lazy import of ray_executor
    known = _modules()
    runner = "fmbseg.engine.runner"
    assert "fmbseg.engine.ray_executor" in _imports(runner, known[runner], known)
    assert "fmbseg.engine.runner" not in _imports(
        "fmbseg.engine.ray_executor", known["fmbseg.engine.ray_executor"], known
    )
