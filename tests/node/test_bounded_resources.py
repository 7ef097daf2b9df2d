"""Bounded disk, connections and log lines: the quarantine cap, the disk watermark on a
real (small) file system, the HTTP header timeout and connection cap, and background
loops that back off when the disk or the database fails."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node.loop_health import LoopHealth
from dicom_node.node import Node
from tests.node.conftest import (
    Index,
    make_ct_series,
    node_config_data,
    status_json,
    wait_until,
)
from tests.node.test_malformed import part10
from tests.peers import missing

pytestmark = pytest.mark.peers

HTTP = {"enabled": True, "host": "127.0.0.1", "port": 0}


@pytest.fixture
def chunked_send() -> Iterator[None]:
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = old


def _send(port: int, files: list[Path]) -> list[int]:
    ae = AE(ae_title="BOUNDS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="TESSERA")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()


def _garbage(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` C-STORE payloads that cannot be decoded (each quarantined), told apart by
    their first bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        path = folder / f"garbage-{i}.dcm"
        body = f"garbage {i:04d} ".encode() * (size // 13)
        path.write_bytes(part10(body, CTImageStorage, generate_uid()))
        files.append(path)
    return files


@pytest.mark.parametrize("cap", ["entries", "bytes"])
def test_quarantine_cap_drops_the_oldest_and_counts_them(
    cap: str, tmp_path: Path, chunked_send: None, start_node: Callable[..., Node],
) -> None:
    limits: dict[str, Any] = ({"quarantine_max_files": 3} if cap == "entries"
                              else {"quarantine_max_mb": 0.05})  # 20 KB payloads: 2 fit
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir, node=limits, http=HTTP))
    statuses = _send(node.port, _garbage(tmp_path / "bad", 5, 20_000))
    assert statuses == [0xC210] * 5

    kept = sorted((data_dir / "quarantine").glob("*.bin"))
    want = 3 if cap == "entries" else 2
    assert [p.read_bytes()[-20_000:][:12] for p in kept] == \
        [f"garbage {i:04d}".encode() for i in range(5 - want, 5)], "not the newest kept"
    report = status_json(tmp_path / "node-0.toml")
    assert report["quarantine"]["entries"] == want
    assert report["quarantine"]["dropped"] == 5 - want
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics",
                                timeout=30) as resp:
        metrics = resp.read().decode()
    assert f"tessera_node_quarantine_dropped_total {5 - want}.0" in metrics
    assert f"tessera_node_quarantine_entries {want}.0" in metrics


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs (root only; under CI the run is root, so it never skips there)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        missing("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        missing(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path: Path, keep_free: int) -> None:
    """Grow ``path`` until only ``keep_free`` bytes are free on its file system."""
    free = shutil.disk_usage(path.parent).free
    with path.open("ab") as f:
        f.write(b"\0" * max(0, free - keep_free))


def _stow(port: int, part: bytes) -> int:
    boundary = "wm"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
            + f"\r\n--{boundary}--\r\n".encode())
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/dicomweb/studies", data=body, method="POST",
        headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                 f"boundary={boundary}", "Authorization": "Bearer t"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_disk_watermark_refuses_new_instances_before_the_disk_is_full(
    tmp_path: Path, small_disk: Path, start_node: Callable[..., Node],
    open_index: Callable[[Path], Index],
) -> None:
    from viewer_bridge.auth import hash_token

    series = make_ct_series(tmp_path / "ct", 3)
    data_dir = small_disk / "node"
    node = start_node(node_config_data(
        data_dir, node={"min_free_mb": 8, "min_free_percent": 0},
        http={**HTTP, "tokens": [hash_token("t")]}))
    assert _send_files(node.port, series.files[:1]) == [0x0000]

    ballast = small_disk / "ballast"
    _fill(ballast, 4 << 20)  # 4 MiB free: under the 8 MiB watermark, not full
    assert _send_files(node.port, series.files[1:2]) == [0xA700]
    assert _stow(node.http_port, series.files[1].read_bytes()) == 503
    index = open_index(data_dir)
    assert index.instance_count() == 1
    low = index.audit("disk-low")
    assert len(low) == 1 and "watermark" in low[0].reason

    ballast.unlink()
    assert _send_files(node.port, series.files[1:2]) == [0x0000]
    assert _stow(node.http_port, series.files[2].read_bytes()) == 200
    assert index.instance_count() == 3
    assert len(index.audit("disk-ok")) == 1


def _send_files(port: int, files: list[Path]) -> list[int]:
    ae = AE(ae_title="WATERMARK")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="TESSERA")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()


def _closed(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def test_http_connections_with_unfinished_heads_are_closed_and_capped(
    tmp_path: Path, start_node: Callable[..., Node],
) -> None:
    node = start_node(node_config_data(tmp_path / "node", http={
        **HTTP, "header_timeout_s": 1, "max_connections": 4}))
    port = node.http_port
    slow = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: node\r\n")  # no blank line: unfinished
        slow.append(sock)
    for sock in slow:
        assert _closed(sock, 15), "a connection with an unfinished head stayed open"
        sock.close()
    assert _healthz(port) == 200

    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    try:
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        with contextlib.closing(extra):
            assert _closed(extra, 5), "a connection over http.max_connections was kept"
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: _healthz(port) == 200, timeout=15, what="/healthz once they closed")


def test_loop_health_logs_once_per_state_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger("test.loop")
    health = LoopHealth("assembler", 0.5, max_s=4, logger=log)
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    waits = [health.failed(disk_full) for _ in range(30)]
    assert waits[:4] == [1.0, 2.0, 4.0, 4.0] and max(waits) == 4
    assert health.succeeded() == 0.5
    levels = [(r.levelno, r.getMessage()) for r in caplog.records
              if r.levelno >= logging.WARNING]
    assert len(levels) == 2, levels  # one on failing, one on recovering
    assert levels[0][0] == logging.ERROR and "backing off" in levels[0][1]
    assert "works again after 30" in levels[1][1]


def test_assembler_backs_off_when_the_disk_fails(
    tmp_path: Path, start_node: Callable[..., Node], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The assembler's tick fails as on a full disk for a while: one error line and one
    recovery line, not a traceback per poll (poll 0.1 s)."""
    node = start_node(node_config_data(tmp_path / "node"))
    calls = {"n": 0, "fail": True}
    real_tick = node.parts.assembler.tick

    def tick() -> bool:
        calls["n"] += 1
        if calls["fail"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_tick()

    caplog.set_level(logging.INFO, logger="dicom_node.node")
    monkeypatch.setattr(node.parts.assembler, "tick", tick)
    wait_until(lambda: calls["n"] >= 5, timeout=60, what="five failed ticks")
    calls["fail"] = False
    wait_until(lambda: any("works again after" in r.getMessage() for r in caplog.records),
               timeout=60, what="the recovery line")
    lines = [r for r in caplog.records if r.name == "dicom_node.node"
             and r.levelno >= logging.WARNING]
    assert len(lines) == 2, [r.getMessage() for r in lines]
