"""STOW-RS peak memory: a 100 MiB body of 40 instances is parsed as it arrives, each part
spooled to disk, so the node's peak RSS grows by a fraction of the body (it used to
hold about three times the body)."""

from __future__ import annotations

import copy
import http.client
import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.node.conftest import NodeProcess, node_config_data, wait_until, write_node_config
from tests.peers import free_port
from tests.viewer.conftest import TOKEN

pytestmark = pytest.mark.peers

PARTS, PART_BYTES = 40, int(2.5 * 2**20)
BOUNDARY = "memory-boundary"


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _instances() -> Iterator[bytes]:
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    template.add_new((0x0009, 0x0010), "LO", "TESSERA TEST")
    template.add_new((0x0009, 0x1000), "OB", b"\x00" * PART_BYTES)
    study, series = generate_uid(), generate_uid()
    for _ in range(PARTS):
        ds = copy.copy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta = copy.deepcopy(template.file_meta)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        yield buf.getvalue()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[NodeProcess, int]]:
    """``tessera node serve`` with DICOMweb on a free port: (process, HTTP port)."""
    from viewer_bridge.auth import hash_token

    http_port = free_port()
    data = node_config_data(tmp_path / "node", http={
        "enabled": True, "host": "127.0.0.1", "port": http_port,
        "tokens": [hash_token(TOKEN)], "max_stow_mb": 256})
    proc = NodeProcess(write_node_config(tmp_path / "node.toml", data), tmp_path / "node.log")
    try:
        yield proc, http_port
    finally:
        proc.stop()


def test_stow_of_a_large_body_keeps_node_memory_bounded(
    node: tuple[NodeProcess, int],
) -> None:
    proc, http_port = node
    pid = proc.proc.pid

    def healthy() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    wait_until(healthy, timeout=60, what="the node's HTTP port")
    chunks = [f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
              + b"\r\n" for part in _instances()]
    chunks.append(f"--{BOUNDARY}--\r\n".encode())
    body_bytes = sum(len(c) for c in chunks)

    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak to the current RSS
    before = _status(pid)["VmRSS"]
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=300)
    conn.putrequest("POST", "/dicomweb/studies")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Type",
                   f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
    conn.putheader("Content-Length", str(body_bytes))
    conn.endheaders()
    for chunk in chunks:
        conn.send(chunk)
    response = conn.getresponse()
    reply = response.read()
    conn.close()
    assert response.status == 200, reply[:500]
    peak = _status(pid)["VmHWM"] - before
    print(f"\nSTOW-RS of {body_bytes / 2**20:.0f} MiB in {PARTS} parts: node peak RSS grew "
          f"by {peak / 2**20:.1f} MiB")
    assert peak < 48 * 2**20, f"peak RSS grew by {peak} bytes for a {body_bytes}-byte body"
