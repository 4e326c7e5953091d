"""The package's shape (ARCHITECTURE.md): imports only go down (no cycle, lazy imports included), and no module
outgrows one job (a line budget; kernels exempt)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "atax_kernels"
MAX_LINES = 500
#: Kernel sources may be long (one kernel and its launch helpers belong together).
KERNELS = {"ops/triton/gram.py", "ops/triton/combine.py", "ops/triton/remove_span.py", "ops/triton/_table.py"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its source (module level or inside functions)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        # a module's own package (its __init__ runs first anyway) is not an edge
        out |= {t for t in targets if t in known and t != name and not name.startswith(t + ".")}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    assert _cycles(graph) == []


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("rel", sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py")))
def test_module_has_one_job(rel):
    path = PKG / rel
    if rel in KERNELS:
        pytest.skip("kernel source")
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"atax_kernels/{rel} has {n} lines (> {MAX_LINES}): split it by responsibility"
    if path.stat().st_size > 0:
        assert ast.get_docstring(ast.parse(path.read_text())) or path.name == "__main__.py", \
            f"atax_kernels/{rel} has no module docstring saying its job"
