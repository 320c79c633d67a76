"""No import cycles between nsa_lab's top-level packages and modules.

Every ``import`` statement of every module counts, those inside functions included: a
deferred import hides a cycle from the interpreter, not from the design. A module's
edges are lumped to its unit, ``nsa_lab.<package>`` or ``nsa_lab.<module>`` (the
``kernels/`` tree installs as ``nsa_lab.kernels``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Source roots: the package name each tree installs as (see pyproject's package-dir).
ROOTS = {"nsa_lab": REPO / "nsa_lab", "nsa_lab.kernels": REPO / "kernels"}


def _modules() -> Iterator[tuple[str, Path]]:
    for prefix, base in ROOTS.items():
        for path in sorted(base.rglob("*.py")):
            parts = [p for p in path.relative_to(base).with_suffix("").parts if p != "__init__"]
            yield ".".join([prefix, *parts]), path


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = package[: len(package) - node.level + 1]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    if source == "nsa_lab":  # `from nsa_lab import config` imports the module config
        return [f"nsa_lab.{alias.name}" for alias in node.names]
    return [source]


def import_graph() -> dict[str, dict[str, list[str]]]:
    """``{unit: {imported unit: ["module:line", ...]}}`` over every import statement."""
    edges: dict[str, dict[str, list[str]]] = {}
    for module, path in _modules():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, module, is_package):
                if not target.startswith("nsa_lab."):
                    continue
                a, b = _unit(module), _unit(target)
                if a != b:
                    edges.setdefault(a, {}).setdefault(b, []).append(f"{module}:{node.lineno}")
    return edges


def cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    nodes = set(edges) | {b for targets in edges.values() for b in targets}
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def describe(edges: dict[str, dict[str, list[str]]], component: list[str]) -> str:
    members = set(component)
    lines = [" <-> ".join(component)]
    for a in component:
        for b, where in sorted(edges.get(a, {}).items()):
            if b in members:
                lines.append(f"  {a} -> {b}: {', '.join(where)}")
    return "\n".join(lines)


def test_the_graph_sees_the_packages():
    edges = import_graph()
    assert "nsa_lab.config" in edges["nsa_lab.training"]
    assert "nsa_lab.kernels" in edges["nsa_lab.attention"]
    assert "nsa_lab.training" in edges["nsa_lab.cli"]  # a function-level import counts


def test_the_cycle_finder_finds_a_cycle():
    edges = {"a": {"b": ["a:1"]}, "b": {"c": ["b:1"]}, "c": {"a": ["c:1"]}, "d": {"a": []}}
    assert cycles(edges) == [["a", "b", "c"]]


def test_no_import_cycles_between_top_level_units():
    edges = import_graph()
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(describe(edges, c) for c in found)


def test_attention_does_not_import_config():
    assert "nsa_lab.config" not in import_graph().get("nsa_lab.attention", {})


def test_training_does_not_import_evaluation():
    assert "nsa_lab.evaluation" not in import_graph().get("nsa_lab.training", {})


if __name__ == "__main__":  # python tests/test_layering.py: print the graph and its cycles
    graph = import_graph()
    for a in sorted(graph):
        for b in sorted(graph[a]):
            print(f"{a} -> {b}  ({len(graph[a][b])} imports)")
    print("cycles:", [describe(graph, c) for c in cycles(graph)] or "none")
