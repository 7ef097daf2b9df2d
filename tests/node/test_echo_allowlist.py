"""C-ECHO with dcmtk echoscu, and the association allowlist."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.node import Node
from tests.node.conftest import Index, echoscu, node_config_data, status_json, write_node_config

pytestmark = pytest.mark.peers


def test_echoscu_succeeds(start_node: Callable[..., Node]) -> None:
    node = start_node()
    result = echoscu(node.port)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ae_not_on_allowlist_is_rejected(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    data_dir = tmp_path / "node"
    data = node_config_data(data_dir)
    data["dicom"]["allow"] = [{"ae_title": "ALLOWED", "networks": ["127.0.0.0/8"]}]
    node = start_node(data)

    refused = echoscu(node.port, calling_ae="INTRUDER")
    assert refused.returncode != 0
    assert "reject" in (refused.stdout + refused.stderr).lower()

    allowed = echoscu(node.port, calling_ae="ALLOWED")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr

    events = open_index(data_dir).audit("association-rejected")
    assert len(events) == 1
    assert "INTRUDER" in events[0].reason
    assert events[0].peer_address == "127.0.0.1"

    config = write_node_config(tmp_path / "status.toml", data)
    report = status_json(config)
    assert report["events"]["counts"].get("association-rejected") == 1
    assert any(e["kind"] == "association-rejected" and e["peer_ae"] == "INTRUDER"
               for e in report["events"]["recent"])


def test_allowlist_network_is_enforced(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    """The right AE title from a network not on the list is refused too."""
    data_dir = tmp_path / "node"
    data = node_config_data(data_dir)
    data["dicom"]["allow"] = [{"ae_title": "*", "networks": ["10.0.0.0/8"]}]
    node = start_node(data)
    assert echoscu(node.port).returncode != 0
    assert len(open_index(data_dir).audit("association-rejected")) == 1
