"""dicom.max_associations: associations beyond the limit are rejected, not queued."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.node.conftest import echoscu, node_config_data, wait_until


def test_association_over_the_limit_is_rejected_and_the_next_one_accepted(
    tmp_path: Path, start_node: Any
) -> None:
    data = node_config_data(tmp_path / "node")
    data["dicom"]["max_associations"] = 1
    node = start_node(data)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert held.is_established
    try:
        refused = echoscu(node.port)
        assert refused.returncode != 0
        assert "reject" in (refused.stdout + refused.stderr).lower()
    finally:
        held.release()
    # the released association's thread may take a moment to leave the active list
    wait_until(lambda: echoscu(node.port).returncode == 0, timeout=20, interval=0.2,
               what="an echo after the held association was released")
