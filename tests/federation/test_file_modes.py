"""The hub's files are private whatever the umask (issue 22 item 6): directories 0700,
database, blobs, partial uploads, lock and keys 0600; metrics on loopback by default."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.numpy import save
from typer.testing import CliRunner

from federation_grpc.hub.certs import make_certs
from federation_grpc.hub.cli import hub_app
from federation_grpc.hub.config import EXAMPLE_CONFIG, HubConfig, load_config
from federation_grpc.hub.service import HubService

from .conftest import ALL_GROUPS, MODEL_CONFIG, enrol, header_for, hub_config, nudged, small_model


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    found = {str(root): stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(root: Path) -> None:
    wrong = {
        name: oct(mode)
        for name, mode in modes(root).items()
        if mode != (0o700 if (root / name).is_dir() else 0o600)
    }
    assert not wrong, wrong


def test_hub_data_is_private_under_umask_000(tmp_path: Path, open_umask: None) -> None:
    root = tmp_path / "var"  # the hub creates it, and everything below
    config = hub_config(root)
    service = HubService(config)
    try:
        service.init_model(save(small_model()), MODEL_CONFIG)
        node = enrol(service)
        payload = save(nudged(small_model(), ALL_GROUPS))
        header = header_for(payload, ALL_GROUPS)
        session = service.uploads.begin(node, header)
        session.write(payload[: len(payload) // 2])  # a partial upload stays staged
        session.finish()
        other = save(nudged(small_model(), ALL_GROUPS, seed=2))
        done = service.uploads.begin(node, header_for(other, ALL_GROUPS))
        done.write(other)
        done.finish()
        assert service.aggregator.process_pending() == [1]  # a merged blob, the lock
        names = set(modes(root))  # while the database is open: its -wal and -shm too
        for expected in ("hub/hub.db", "hub/hub.db-wal", "hub/hub.db-shm", "hub/merge.lock",
                         "hub/blobs", "hub/staging"):
            assert expected in names, sorted(names)
        assert len(list((root / "hub" / "blobs").rglob("*.*"))) == 0, "no temporary left"
        assert len([p for p in (root / "hub" / "blobs").rglob("*") if p.is_file()]) == 3
        assert list((root / "hub" / "staging").iterdir()), "the partial upload"
        assert_private(root)
    finally:
        service.close()
    assert_private(root)


def test_hub_migrate_creates_a_private_database(tmp_path: Path, open_umask: None) -> None:
    data = tmp_path / "migrated"
    config = tmp_path / "hub.toml"
    config.write_text(f'[hub]\ndata_dir = "{data}"\n')
    result = CliRunner().invoke(hub_app, ["migrate", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert (data / "hub.db").exists()
    assert_private(data)


def test_certificates_keys_are_private_under_umask_000(tmp_path: Path, open_umask: None) -> None:
    made = make_certs(tmp_path / "tls", nodes=("node1",))
    for issued in made.values():
        assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600, issued.key
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700


def test_metrics_bind_loopback_by_default(tmp_path: Path) -> None:
    assert ipaddress.ip_address(HubConfig().metrics.host).is_loopback
    example = tmp_path / "hub.toml"
    example.write_text(EXAMPLE_CONFIG)
    assert ipaddress.ip_address(load_config(example).metrics.host).is_loopback
