"""The committed generated code must equal a fresh generation from proto/."""

from __future__ import annotations

from pathlib import Path

from federation_grpc._proto import regenerate


def test_committed_code_matches_fresh_generation(tmp_path: Path) -> None:
    fresh = {p.name: p.read_text() for p in regenerate.generate(tmp_path)}
    committed = {
        p.name: p.read_text()
        for p in regenerate.PACKAGE_DIR.iterdir()
        if p.name.endswith(regenerate.GENERATED_SUFFIXES)
    }
    hint = "run python -m federation_grpc._proto.regenerate"
    assert sorted(fresh) == sorted(committed), hint
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: {hint}"


def test_generated_modules_import_as_a_package() -> None:
    from federation_grpc._proto import admin_pb2, admin_pb2_grpc, federation_pb2_grpc

    assert admin_pb2.DESCRIPTOR.package == "tessera.federation.v1"
    assert hasattr(federation_pb2_grpc, "FederationServicer")
    assert hasattr(admin_pb2_grpc, "AdminStub")
