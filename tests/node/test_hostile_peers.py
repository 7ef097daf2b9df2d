"""Hostile and broken DICOM peers on loopback: connections that never associate, too
many connections from one address, PDUs that declare more than the node accepts.

Every probe is bounded in count, bytes and time; waits are for conditions with a
deadline. Measured figures (echoscu time under slowloris, RSS growth) are printed,
never asserted as times.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.node import Node
from tests.node.conftest import (
    Index,
    NodeProcess,
    echoscu,
    node_config_data,
    wait_until,
    write_node_config,
)

pytestmark = pytest.mark.peers


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the node closes ``sock`` within ``within`` seconds (reads what it sends)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def test_slowloris_does_not_lock_the_pacs_out(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    """Ten sockets that each send the first two bytes of an A-ASSOCIATE-RQ and stop:
    echoscu still gets through, and the node closes them after association_timeout_s."""
    timeout_s = 2.0
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir, dicom={"association_timeout_s": timeout_s}))
    loris = [_connect(node.port) for _ in range(10)]
    for sock in loris:
        sock.sendall(b"\x01\x00")
    started = time.monotonic()
    attempts = []

    def echo() -> bool:
        attempts.append(echoscu(node.port, timeout=20).returncode)
        return attempts[-1] == 0

    wait_until(echo, timeout=timeout_s + 15, interval=0.2, what="echoscu under slowloris")
    print(f"\nechoscu succeeded {time.monotonic() - started:.2f} s after 10 slowloris "
          f"sockets (association_timeout_s={timeout_s}), attempt {len(attempts)}")
    for sock in loris:
        assert _closed_by_peer(sock, timeout_s + 10), "a silent connection stayed open"
        sock.close()
    # Ten timeouts from one address: one log line and one audit row (rate-limited).
    events = open_index(data_dir).audit("association-timeout")
    assert len(events) == 1, [e.reason for e in events]
    assert events[0].peer_address == "127.0.0.1"
    assert node.scp is not None
    wait_until(lambda: node.scp is not None and node.scp.server.guard.open_connections() == 0,
               timeout=timeout_s + 10, what="no connection left counted")


def test_connections_over_the_per_address_limit_are_closed_and_audited_once(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir, dicom={
        "max_connections_per_address": 2, "association_timeout_s": 60}))
    held = [_connect(node.port) for _ in range(2)]
    assert node.scp is not None
    guard = node.scp.server.guard
    wait_until(lambda: guard.open_connections("127.0.0.1") == 2, timeout=10,
               what="two connections held")
    extra = [_connect(node.port) for _ in range(4)]
    for sock in extra:
        assert _closed_by_peer(sock, 10), "a connection over the limit was kept"
        sock.close()
    assert echoscu(node.port).returncode != 0
    events = open_index(data_dir).audit("connection-refused")
    assert len(events) == 1, [e.reason for e in events]
    assert "max_connections_per_address" in events[0].reason
    for sock in held:
        assert not _closed_by_peer(sock, 0.2), "a connection under the limit was closed"
        sock.close()
    wait_until(lambda: echoscu(node.port).returncode == 0, timeout=20, interval=0.2,
               what="echoscu once the held connections closed")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _push(sock: socket.socket, header: bytes, limit: int) -> int:
    """Send ``header`` then zeros, up to ``limit`` bytes or until the node closes."""
    chunk = b"\x00" * (1 << 20)
    sent = 0
    sock.settimeout(10)
    try:
        sock.sendall(header)
        while sent < limit:
            sock.sendall(chunk)
            sent += len(chunk)
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        pass
    return sent


def test_huge_association_request_from_a_disallowed_ae_is_aborted_before_it_is_read(
    tmp_path: Path, node_process: Callable[..., NodeProcess],
    open_index: Callable[[Path], Index],
) -> None:
    """An A-ASSOCIATE-RQ declaring 0xFFFFFFFF bytes, then up to 50 MB: the node reads
    the 6-byte header, aborts, and its memory does not grow with what was sent."""
    data_dir = tmp_path / "node"
    data = node_config_data(data_dir)
    data["dicom"]["allow"] = [{"ae_title": "ALLOWED", "networks": ["127.0.0.0/8"]}]
    config = write_node_config(tmp_path / "node.toml", data)
    node = node_process(config)
    pid = node.proc.pid
    # A first connection warms the accept path up (threads, imports) before measuring.
    assert echoscu(node.port, calling_ae="ALLOWED").returncode == 0
    before = _rss_bytes(pid)
    sock = _connect(node.port)
    sent = _push(sock, b"\x01\x00" + struct.pack(">L", 0xFFFFFFFF), 50 << 20)
    assert _closed_by_peer(sock, 10), "the connection stayed open"
    sock.close()
    growth = _rss_bytes(pid) - before
    print(f"\nA-ASSOCIATE-RQ of 0xFFFFFFFF declared bytes: {sent / 2**20:.0f} MiB pushed "
          f"before the close, node RSS grew by {growth / 2**20:.1f} MiB")
    assert growth < 16 << 20, f"RSS grew by {growth} bytes"
    wait_until(lambda: open_index(data_dir).audit("pdu-oversized"), timeout=10,
               what="a pdu-oversized audit event")
    # The node keeps serving.
    assert echoscu(node.port, calling_ae="ALLOWED").returncode == 0


def _associated(node: Node, ae_title: str) -> Any:
    """An established association (Verification) from ``ae_title`` to ``node``."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert assoc.is_established
    return assoc


def _p_data_aborts(assoc: Any, *, declared: int, sent: int) -> None:
    """Send a P-DATA-TF header declaring ``declared`` bytes and ``sent`` bytes after it;
    the node aborts the association."""
    raw = assoc.dul.socket.socket
    assert raw is not None
    header = b"\x04\x00" + struct.pack(">L", declared)
    with contextlib.suppress(OSError):  # closed while sending: what the tests want
        raw.sendall(header + b"\x00" * sent)
    wait_until(lambda: not assoc.is_established, timeout=10,
               what="the association aborted")
    assert assoc.is_aborted


def test_oversized_p_data_on_an_established_association_is_aborted(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir))
    assoc = _associated(node, "BIGPDU")
    assert assoc.acceptor.maximum_length == 128 * 1024  # [dicom] max_pdu_kb's default
    # P-DATA-TF declaring 2 GiB, far over the 128 KiB the node negotiated.
    _p_data_aborts(assoc, declared=0x7FFFFFFF, sent=4 << 20)
    events = open_index(data_dir).audit("pdu-oversized")
    assert len(events) == 1 and "P-DATA-TF" in events[0].reason, [e.reason for e in events]
    assert echoscu(node.port).returncode == 0


def test_a_pdu_one_byte_over_the_configured_maximum_is_refused_unread(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    """``[dicom] max_pdu_kb`` is what the node offers in its A-ASSOCIATE-AC and what it
    holds the peer to."""
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir, dicom={"max_pdu_kb": 20}))
    assoc = _associated(node, "PDUSIZE")
    assert assoc.acceptor.maximum_length == 20 * 1024
    assert assoc.send_c_echo().Status == 0x0000
    _p_data_aborts(assoc, declared=20 * 1024 + 1, sent=20 * 1024 + 1)
    events = open_index(data_dir).audit("pdu-oversized")
    assert len(events) == 1 and "over the limit of 20480" in events[0].reason, \
        [e.reason for e in events]


def test_rejections_at_max_associations_are_audited_once(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir, dicom={"max_associations": 1}))
    held = _associated(node, "HOLDER")
    try:
        for _ in range(3):
            assert echoscu(node.port).returncode != 0
    finally:
        held.release()
    events = open_index(data_dir).audit("association-limit")
    assert len(events) == 1, [e.reason for e in events]
    assert "max_associations" in events[0].reason and events[0].peer_ae == "ECHOSCU"


def test_connections_over_the_node_limit_are_closed(
    tmp_path: Path, start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir, dicom={
        "max_connections": 2, "association_timeout_s": 60}))
    held = [_connect(node.port) for _ in range(2)]
    assert node.scp is not None
    wait_until(lambda: node.scp is not None and node.scp.server.guard.open_connections() == 2,
               timeout=10, what="two connections held")
    try:
        extra = _connect(node.port)
        assert _closed_by_peer(extra, 10), "a connection over dicom.max_connections was kept"
        extra.close()
    finally:
        for sock in held:
            sock.close()
    events = open_index(data_dir).audit("connection-refused")
    assert len(events) == 1 and "dicom.max_connections)" in events[0].reason
    wait_until(lambda: echoscu(node.port).returncode == 0, timeout=20, interval=0.2,
               what="echoscu once the held connections closed")
