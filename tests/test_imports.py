"""The package's import graph: no module of lwlib imports itself back through others (issue 29)."""

from __future__ import annotations

import ast

from lwlib.runs import REPO_ROOT

PKG = REPO_ROOT / "lwlib"


def import_graph() -> dict[str, set[str]]:
    """lwlib module -> the lwlib modules it imports, at module level or inside a function (a deferred import is
    an edge too: it only hides the cycle until the function runs)."""
    mods = {p.stem for p in PKG.glob("*.py")}
    graph = {}
    for p in PKG.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 or (node.level == 0 and (node.module or "").split(".")[0] == "lwlib"):
                    parts = (node.module or "").split(".")[(0 if node.level else 1):]
                    deps |= {parts[0]} if parts and parts[0] else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lwlib.")}
        graph[p.stem] = {d for d in deps if d in mods and d != p.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle_through_a_deferred_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    g = import_graph()
    assert "runs" in g["config"] and "served" in g["backends"]  # a module-level and a deferred import are edges


def test_lwlib_has_no_import_cycles():
    g = import_graph()
    found = cycles(g)
    assert not found, "import cycles among lwlib modules: " + "; ".join(
        " <-> ".join(f"{m} (imports {sorted(g[m] & set(c))})" for m in c) for c in found)
