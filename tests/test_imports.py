"""Imports point one way, from kernels up to `main.py` (docs/design.md): the package-level import graph of lcjax
(`lcjax.<package>` and `kernels_pallas` as nodes, every import statement an edge, function-level ones included)
has no cycle, and follows the layer order."""

import ast
import os

from tests.conftest import ROOT

# Lower layers first; a package may import only packages of earlier layers (or its own).
LAYERS = [
    {"kernels_pallas", "lcjax.errors"},
    {"lcjax.parallel", "lcjax.data", "lcjax.eval"},
    {"lcjax.layers"},
    {"lcjax.models"},
    {"lcjax.config"},
    {"lcjax.train"},
    {"lcjax.experiments", "lcjax.export"},
]


def _node(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "kernels_pallas":
        return "kernels_pallas"
    if parts[0] != "lcjax" or len(parts) == 1:
        return None
    return "lcjax." + parts[1]


def import_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for package in ("lcjax", "kernels_pallas"):
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                source = _node(module)
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.Import):
                        targets = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                        targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
                    else:
                        continue
                    for target in filter(None, map(_node, targets)):
                        if source and target != source:
                            edges.setdefault(source, set()).add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one package (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(set(edges) | {w for targets in edges.values() for w in targets}):
        if v not in index:
            visit(v)
    return groups


def test_the_package_import_graph_has_no_cycle_and_follows_the_layers():
    edges = import_graph()
    assert cycles(edges) == []
    layer = {package: i for i, packages in enumerate(LAYERS) for package in packages}
    assert set(edges) <= set(layer), f"packages missing from LAYERS: {sorted(set(edges) - set(layer))}"
    upward = sorted((s, t) for s, targets in edges.items() for t in targets if layer[t] >= layer[s] and t != s)
    assert upward == [], f"imports against the layer order: {upward}"


def test_the_cycle_finder_finds_cycles():
    """Guards the test above: the graph of the code before the model skeleton had parallel -> train -> parallel and
    train -> eval -> train; a cycle like them is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
