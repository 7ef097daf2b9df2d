"""No module reads another's private names: ``obj._name`` is for ``self``/``cls`` only,
and nothing imports a ``_name`` (the generated ``_proto`` package aside).

A private name used across a module boundary is an interface nobody declared; make it
public in the module that owns it, or move the code that needs it there.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dicom_node", "federation_grpc", "viewer_bridge")
SKIP = ("_proto", "migrations")
# pynetdicom's internals the DICOM layer relies on: pynetdicom 3.x (pyproject pins
# >=3.0,<4) has no public hook for its options module, the DUL's reactor handshake, idle
# timer and PDU writes (held to the node's send lock), a server's handlers, or an
# association's request dispatch; tests/node covers
# each use. Nothing of the project's own may join this list.
THIRD_PARTY = {
    "dicom_node/dicom/scp.py": {"from pynetdicom import _config"},
    "dicom_node/dicom/upper_layer.py": {"self.assoc._dul_ready", "self.assoc._kill",
                                       "super()._send"},
    "dicom_node/dicom/scu.py": {"from pynetdicom import _config"},
    "dicom_node/dicom/server.py": {"assoc._server", "self.ae._servers", "server._handlers"},
    "dicom_node/dicom/association.py": {"dul._idle_timer", "self.dul._idle_timer",
                                        "self.assoc._serve_request"},
}


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
        if text not in THIRD_PARTY.get(str(path.relative_to(REPO)), set())
    ]
    assert not found, "private names read across modules:\n" + "\n".join(found)
