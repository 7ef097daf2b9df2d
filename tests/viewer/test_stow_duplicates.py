"""STOW-RS of an instance the node already received by C-STORE: the same dataset, so
200 with the instance listed as stored, not 409."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_node.store.models import AuditEvent, Instance
from tests.node.conftest import make_ct_series, storescu
from tests.viewer.conftest import json_body, start_bridge_node

pytestmark = pytest.mark.peers
BOUNDARY = "dup-boundary"


def test_stow_after_c_store_of_the_same_instance_is_200(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct", 1)
    (tmp_path / "bridge").mkdir()
    bridge = start_bridge_node(tmp_path / "bridge")
    try:
        sent = storescu(bridge.node.port, series.files[0], calling_ae="MODALITY")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        part = series.files[0].read_bytes()
        body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
                + f"\r\n--{BOUNDARY}--\r\n".encode())
        status, _, reply = bridge.request(
            "/dicomweb/studies", method="POST", data=body,
            headers={"Content-Type": "multipart/related; type=\"application/dicom\"; "
                                     f"boundary={BOUNDARY}"})
        assert status == 200, reply
        doc = json_body(reply)
        assert "00081198" not in doc  # no failed instances
        stored = doc["00081199"]["Value"]
        assert [s["00081155"]["Value"][0] for s in stored] == [series.sop_uids[0]]
        with bridge.node.parts.db.session() as s:
            assert s.execute(select(func.count()).select_from(Instance)).scalar_one() == 1
            assert s.execute(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.kind == "duplicate-conflict")).scalar_one() == 0
    finally:
        bridge.node.stop()
