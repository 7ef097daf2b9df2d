"""Peer-controlled values the node cannot use: a DIMSE status, never an abort, and never
raw in the log.

- a SOP Instance UID of 300 or 5000 digits, in the C-STORE command or in the data set:
  0xA900, and a C-ECHO on the same association then succeeds;
- an AE title with a newline and a NUL: logged escaped, one record, no forged line.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.node import Node
from tests.node.conftest import (
    Index,
    NodeProcess,
    echoscu,
    make_ct_series,
    node_config_data,
    wait_until,
    write_node_config,
)
from tests.node.test_malformed import encode, part10

pytestmark = [pytest.mark.peers, pytest.mark.filterwarnings("ignore:Invalid value for VR UI")]


@pytest.fixture
def chunked_send_without_uid_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The test's SCU sends file bytes as they are and lets any UID into its command
    (pynetdicom's own checks would refuse to send a 300-digit UID). Only the test's
    thread skips the UID check: the node, serving from its own threads, keeps it."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    check_ui = _config.VALIDATORS["UI"]

    def lax_in_the_test_thread(value: Any) -> tuple[bool, str]:
        if threading.current_thread() is threading.main_thread():
            return True, ""
        return check_ui(value)

    monkeypatch.setitem(_config.VALIDATORS, "UI", lax_in_the_test_thread)
    yield


@pytest.mark.parametrize("where", ["command", "dataset"])
@pytest.mark.parametrize("digits", [300, 5000])
def test_overlong_sop_instance_uid_gets_a900_and_the_association_lives_on(
    where: str, digits: int, tmp_path: Path, chunked_send_without_uid_checks: None,
    start_node: Callable[..., Node], open_index: Callable[[Path], Index],
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    series = make_ct_series(tmp_path / "ct", 1)
    ds = pydicom.dcmread(series.files[0])
    long_uid = "1" * digits
    ds.SOPInstanceUID = long_uid
    command_uid = long_uid if where == "command" else generate_uid()
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(part10(encode(ds), CTImageStorage, command_uid))

    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir))
    # The node's server bound pynetdicom's logging handlers when it started; the test's
    # SCU, created now, binds none, so every record about the UID comes from the node.
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    ae = AE(ae_title="LONGUID")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(bad)
        assert status and int(status.Status) == 0xA900, status
        echo = assoc.send_c_echo()
        assert echo and int(echo.Status) == 0x0000
        assert assoc.is_established
    finally:
        assoc.release()

    events = open_index(data_dir).audit("instance-refused")
    assert len(events) == 1 and events[0].status == 0xA900, [e.reason for e in events]
    assert long_uid[:65] not in (events[0].reason or "")
    assert open_index(data_dir).instance_count() == 0
    # Nothing in the node logs the whole UID (pynetdicom's own records included). The
    # node serves from its own threads; the test's SCU builds its request in this one.
    assert not [r.name for r in caplog.records
                if long_uid[:65] in r.getMessage() and r.threadName != "MainThread"]


def _association_request(calling: bytes, called: bytes = b"TESSERA") -> bytes:
    """A real A-ASSOCIATE-RQ (recorded from pynetdicom) with its calling AE title bytes
    replaced by ``calling`` (16 bytes, padded)."""
    sent: list[bytes] = []

    def record(event: evt.Event) -> None:
        if not sent:
            sent.append(bytes(event.data))

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    ae = AE(ae_title="PLACEHOLDER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 2
    ae.associate("127.0.0.1", listener.getsockname()[1], ae_title=called.decode(),
                 evt_handlers=[(evt.EVT_DATA_SENT, record)])
    listener.close()
    pdu = sent[0]
    assert pdu[0] == 0x01 and struct.unpack(">L", pdu[2:6])[0] == len(pdu) - 6
    return pdu[:26] + calling.ljust(16, b" ")[:16] + pdu[42:]


@pytest.mark.parametrize("allowed", [True, False])
def test_ae_title_with_newline_and_nul_does_not_forge_log_lines(
    allowed: bool, tmp_path: Path, start_node: Callable[..., Node],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    data = node_config_data(tmp_path / "node")
    if not allowed:
        data["dicom"]["allow"] = [{"ae_title": "ALLOWED", "networks": ["127.0.0.0/8"]}]
    node = start_node(data)
    evil = b"EV\nFORGED\x00LINE"
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(_association_request(evil))
        sock.settimeout(10)
        answer = sock.recv(6)
    assert answer[:1] in (b"\x02", b"\x03", b"\x07")  # accepted, rejected or aborted
    records = [r for r in caplog.records if r.name.startswith(("dicom_node", "pynetdicom"))]
    messages = [r.getMessage() for r in records]
    assert not [m for m in messages if "\n" in m or "\x00" in m], messages
    assert any("EV\\nFORGED\\x00LINE" in m for m in messages), messages
    wait_until(lambda: echoscu(node.port, calling_ae="ALLOWED").returncode == 0, timeout=10,
               what="the node still serving")


def test_data_set_far_over_the_limit_is_dropped_as_it_arrives_and_gets_a700(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past max_instance_mb plus the slack kept for the quarantine (0 here), the bytes of
    a data set are dropped as they arrive; the answer is 0xA700 all the same."""
    import dicom_node.dicom.scp as scp

    monkeypatch.setattr(scp, "OVERSIZE_KEPT_BYTES", 0)
    series = make_ct_series(tmp_path / "ct", 1)
    ds = pydicom.dcmread(series.files[0])
    ds.add_new((0x0009, 0x0010), "LO", "TESSERA TEST")
    ds.add_new((0x0009, 0x1000), "OB", b"\x00" * (2 << 20))
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)

    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir, dicom={"max_instance_mb": 0.1}))
    ae = AE(ae_title="TOOBIG")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(big)
        assert status and int(status.Status) == 0xA700, status
        echo = assoc.send_c_echo()
        assert echo and int(echo.Status) == 0x0000
    finally:
        assoc.release()
    events = open_index(data_dir).audit("instance-refused")
    assert len(events) == 1 and "data set of more than" in (events[0].reason or ""), \
        [e.reason for e in events]
    assert open_index(data_dir).instance_count() == 0




@pytest.mark.parametrize("receivers", [1, 2])
def test_a_command_uid_pydicom_would_warn_about_is_refused_without_its_warning(
    receivers: int, tmp_path: Path, chunked_send_without_uid_checks: None,
    node_process: Callable[..., NodeProcess], open_index: Callable[[Path], Index],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``tessera node serve`` reads values without pydicom's validation
    (``node_process.prepare_process``), which would only warn, quoting the peer's value,
    and cost a regular expression per value; so does each receiving process. A command's
    UID with letters and a terminal escape is refused by the node's own check as before,
    and pydicom says nothing."""
    series = make_ct_series(tmp_path / "ct", 1)
    odd_uid = "1.2.826.abc\x1b[2J"
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(part10(encode(pydicom.dcmread(series.files[0])), CTImageStorage, odd_uid))
    data_dir = tmp_path / "node"
    config = node_config_data(data_dir)
    config["dicom"]["receivers"] = receivers
    node = node_process(write_node_config(tmp_path / "node.toml", config))
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # the SCU's own records
    ae = AE(ae_title="ODDUID")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(bad)
        assert status and int(status.Status) == 0xA900, status
    finally:
        assoc.release()
    events = open_index(data_dir).audit("instance-refused")
    assert len(events) == 1 and events[0].status == 0xA900, [e.reason for e in events]
    node.stop()
    log = node.log.read_text(errors="replace")
    assert "not a valid UID" in log or "AffectedSOPInstanceUID" in log, log[-3000:]
    assert "Invalid value for VR" not in log, log[-3000:]
