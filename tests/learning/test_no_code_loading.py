"""Invariant 4, re-checked in the source (issue 23): no ``torch.load`` without
``weights_only=True``, no unpickling, and TorchScript (code) loaded only where a local,
hash-checked file is opened: the operator's install step and the node's own models
directory, never bytes that came over the network."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("dicom_node", "federation_grpc", "viewer_bridge")
# torch.jit.load of a path: the node's own torchscript/<sha256>.pt after its hash check
# (external.py), and the operator's file at `tessera model import` (model_import.py).
JIT_LOAD_ALLOWED = {"dicom_node/learning/external.py", "dicom_node/learning/model_import.py"}


def calls() -> Iterator[tuple[str, ast.Call, str]]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "_proto" in path.parts:
                continue
            rel = path.relative_to(REPO).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call):
                    yield rel, node, ast.unparse(node.func)


def test_torch_load_always_has_weights_only_true() -> None:
    found = []
    for rel, call, name in calls():
        if name == "torch.load":
            flag = {k.arg: k.value for k in call.keywords}.get("weights_only")
            ok = isinstance(flag, ast.Constant) and flag.value is True
            found.append((rel, call.lineno, ok))
    assert found, "the bundle import reads model.pt with torch.load"
    assert all(ok for _, _, ok in found), [f for f in found if not f[2]]


def test_no_unpickling_and_torchscript_only_from_local_files() -> None:
    for rel, call, name in calls():
        assert name not in ("pickle.load", "pickle.loads", "dill.load", "dill.loads"), (rel,
                                                                                        call.lineno)
        if name in ("torch.jit.load", "jit.load"):
            assert rel in JIT_LOAD_ALLOWED, (rel, call.lineno)
            # a path, never a buffer of bytes
            assert not any(isinstance(a, ast.Call) and "BytesIO" in ast.unparse(a.func)
                           for a in call.args), (rel, call.lineno)
