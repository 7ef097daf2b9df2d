"""DICOM TLS for the SCP: certificates from deploy/tls/make-certs.sh, a pynetdicom TLS
SCU (this dcmtk is built without TLS: ``echoscu --help`` lists no +tls)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.node import Node
from tests.deploy.conftest import REPO, subprocess_env
from tests.node.conftest import node_config_data, start_node  # noqa: F401  (fixture)
from tests.peers import venv_tool


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls")
    result = subprocess.run(
        ["sh", str(REPO / "deploy/tls/make-certs.sh"), str(out), "pacs"], cwd=REPO,
        capture_output=True, text=True, timeout=120,
        env=subprocess_env(DICOM_SERVER="node-dicom", DICOM_HOSTS="localhost 127.0.0.1",
                           TESSERA=venv_tool("tessera")))
    assert result.returncode == 0, result.stderr
    for name in ("ca", "hub", "pacs", "node-dicom"):
        assert (out / f"{name}.pem").exists() and (out / f"{name}.key").exists(), name
    return out


def echo(port: int, context: ssl.SSLContext | None) -> int | None:
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    tls = (context, "localhost") if context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="TESSERA", tls_args=tls)
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if status else None


def client_context(tls_dir: Path, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls_dir / "ca.pem")
    if with_cert:
        context.load_cert_chain(tls_dir / "pacs.pem", tls_dir / "pacs.key")
    return context


@pytest.mark.parametrize("receivers", [1, 2])  # 2: a receiving process does the TLS
def test_scp_speaks_mutual_tls(tls_dir: Path, start_node: Callable[..., Node],  # noqa: F811
                               tmp_path: Path, receivers: int) -> None:
    node = start_node(node_config_data(tmp_path / "node", dicom={
        "tls_cert": str(tls_dir / "node-dicom.pem"), "tls_key": str(tls_dir / "node-dicom.key"),
        "tls_ca": str(tls_dir / "ca.pem"), "receivers": receivers}))
    if receivers > 1:
        assert node.receivers is not None and node.receivers.ready() == 1
    assert echo(node.port, client_context(tls_dir, with_cert=True)) == 0x0000
    assert echo(node.port, client_context(tls_dir, with_cert=False)) is None, \
        "a peer without a client certificate got in"
    assert echo(node.port, None) is None, "a plain-TCP peer got in"


def test_scp_tls_without_client_certificates(tls_dir: Path,
                                             start_node: Callable[..., Node],  # noqa: F811
                                             tmp_path: Path) -> None:
    node = start_node(node_config_data(tmp_path / "node", dicom={
        "tls_cert": str(tls_dir / "node-dicom.pem"),
        "tls_key": str(tls_dir / "node-dicom.key")}))
    assert echo(node.port, client_context(tls_dir, with_cert=False)) == 0x0000


def test_silent_tls_clients_stall_no_one_and_are_closed(
    tls_dir: Path, start_node: Callable[..., Node], tmp_path: Path,  # noqa: F811
) -> None:
    """Connections that never send a ClientHello: the handshake waits in their own
    threads (not the accept loop), other peers get in, and they are closed after
    association_timeout_s."""
    timeout_s = 2.0
    node = start_node(node_config_data(tmp_path / "node", dicom={
        "tls_cert": str(tls_dir / "node-dicom.pem"), "tls_key": str(tls_dir / "node-dicom.key"),
        "association_timeout_s": timeout_s}))
    silent = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(3)]
    try:
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
        assoc = ae.associate("127.0.0.1", node.port, ae_title="TESSERA",
                             tls_args=(client_context(tls_dir, with_cert=False), "localhost"))
        assert assoc.is_established, "a silent TLS client stalled everyone else"
        status = assoc.send_c_echo()
        assoc.release()
        assert status and int(status.Status) == 0x0000
        for sock in silent:
            sock.settimeout(timeout_s + 10)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b"", "a silent TLS client was answered"
    finally:
        for sock in silent:
            sock.close()
