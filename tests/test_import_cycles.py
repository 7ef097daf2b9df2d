"""No import circles in the project's own packages, counting imports inside functions too
(a function-level import hides a circle from Python, not from the reader).

Circles still known are listed with the issue that removes them; a new one fails here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dicom_node", "federation_grpc", "viewer_bridge")
SKIP = ("_proto", "migrations")

# None left (issue 19 removed the two hub circles); nothing may join this set.
KNOWN: set[frozenset[str]] = set()


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if any(part in SKIP for part in path.parts):
                continue
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imported(module: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The project modules ``module`` imports, wherever the import statement stands
    (except under ``if TYPE_CHECKING``)."""

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def executed(nodes: Iterator[ast.AST] | list[ast.stmt]) -> Iterator[ast.AST]:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from executed(node.orelse)  # typing-only imports are not executed
                continue
            yield node
            yield from executed(ast.iter_child_nodes(node))

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in executed(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            found = owner(target)
            if found and found != module:
                yield found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(_imported(name, path, known)) for name, path in known.items()}


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [frozenset({"a", "b", "c"})]
    real = import_graph()
    assert "dicom_node.learning.safetensors_io" in real["dicom_node.learning.weights"]


def test_no_new_import_circle() -> None:
    new = [sorted(c) for c in circles(import_graph()) if c not in KNOWN]
    assert not new, f"import circles: {new}"


# The layers, top first: each package may import only the ones below it. The
# composition root (viewer_bridge.main) is the one place that sees the node and its HTTP
# front end together.
LAYERS = ("viewer_bridge", "dicom_node", "federation_grpc")


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    def layer(module: str) -> int:
        return LAYERS.index(module.split(".")[0])

    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if layer(b) < layer(a))


def test_the_layer_check_sees_an_upward_import() -> None:
    graph = {"dicom_node.node": {"viewer_bridge.server", "federation_grpc.client"}}
    assert upward_imports(graph) == [("dicom_node.node", "viewer_bridge.server")]


def test_packages_import_only_the_layers_below() -> None:
    upward = upward_imports(import_graph())
    assert not upward, f"imports from a lower layer to a higher one: {upward}"
