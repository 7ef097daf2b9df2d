"""No module reads another's private names: ``obj._name`` is for ``self``/``cls`` only,
and nothing imports a ``_name`` (the generated ``_proto`` package aside).

A private name used across a module boundary is an interface nobody declared; make it
public in the module that owns it, or move the code that needs it there.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# dicom_node and viewer_bridge follow when issue 19 reaches them.
PACKAGES = ("federation_grpc",)
SKIP = ("_proto", "migrations")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_reads(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of each private name read from another object or module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            found.extend((node.lineno, f"from {node.module} import {alias.name}")
                         for alias in node.names if _private(alias.name))
    return found


def test_the_checker_sees_private_reads() -> None:
    source = ("from m import _hidden, shown\n"
              "def f(service):\n    service._notify()\n    return shown.__name__\n"
              "class C:\n    def g(self):\n        return self._own\n")
    assert private_reads(source) == [(1, "from m import _hidden"), (3, "service._notify")]


def test_no_module_reads_another_modules_private_names() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}: {text}"
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if not any(part in SKIP for part in path.parts)
        for line, text in private_reads(path.read_text(encoding="utf-8"))
    ]
    assert not found, "private names read across modules:\n" + "\n".join(found)
