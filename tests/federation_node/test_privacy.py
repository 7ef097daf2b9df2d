"""Invariant 3 on the wire: a full cycle (enrol, AI SEG, correction, training, upload,
metrics, new generation) and nothing the node sends holds a patient's name or ID, a
study/series/instance UID of the studies, or a run of their pixel bytes."""

from __future__ import annotations

import select as io_select
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicom_node.config import load_config
from dicom_node.node import Node
from tests.corrections.helpers import Study, correction_for, send_corrected_study
from tests.node.conftest import wait_until, write_node_config

from .conftest import WireRecorder, federated_node_data, node_tls, outbox, serving


class RecordingProxy:
    """A loopback TCP proxy that keeps every byte the client sends (insecure variant)."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        try:
            while not self._stop.is_set():
                ready, _, _ = io_select.select(list(peers), [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        with self._lock:
                            self.sent.extend(data)
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


def _secrets(study: Study, seg_path: Path) -> tuple[list[bytes], list[bytes]]:
    """Identifying values of the study and the correction, and 64-byte pixel runs."""
    values: set[str] = set()
    runs: list[bytes] = []
    for ds in [*study.datasets, pydicom.dcmread(seg_path)]:
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                        "SOPInstanceUID"):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 4:
                values.add(value)
    for ds in study.datasets[::8]:
        pixels = bytes(ds.PixelData)
        # a distinctive run: the 64 bytes with the most distinct values in the slice
        starts = range(0, len(pixels) - 64, 256)
        best = max(starts, key=lambda k: len(set(pixels[k:k + 64])))
        assert len(set(pixels[best:best + 64])) > 16
        runs.append(pixels[best:best + 64])
    return sorted(v.encode() for v in values), runs


@pytest.mark.parametrize("transport", ["mtls-interceptor", "insecure-proxy"])
def test_nothing_identifying_leaves_the_node(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path, transport: str
) -> None:
    hub = start_hub()
    proxy = None
    if transport == "insecure-proxy":
        from federation_grpc.hub.config import HubConfig
        from federation_grpc.hub.process import HubServer

        plain = HubServer(HubConfig(data_dir=tmp_path / "plain", port=0), hub.service,
                          insecure_loopback=True, watch_poll_s=0.2, keepalive_s=1.0).start()
        proxy = RecordingProxy(plain.port)
        data = federated_node_data(tmp_path / "site", model_file, f"127.0.0.1:{proxy.port}",
                                   token=hub.token(), insecure=True)
    else:
        data = federated_node_data(tmp_path / "site", model_file, hub.target,
                                   token=hub.token(), tls=node_tls(certs))
    node = Node(load_config(write_node_config(tmp_path / "node.toml", data), env={}))
    wire = WireRecorder()
    node.parts.federation.interceptors.append(wire)
    node.start()
    url = node.config.node.resolved_database_url()
    try:
        study = Study("B", 0, seed=7300)
        seg_path = send_corrected_study(node, study, tmp_path / "corr")
        sop = str(pydicom.dcmread(seg_path).SOPInstanceUID)
        wait_until(lambda: correction_for(node, sop), timeout=60, what="the correction")
        wait_until(lambda: [r for r in outbox(url) if r[1] == "sent"], timeout=180,
                   what="the update delivered")
        wait_until(lambda: serving(url) == (1, "hub"), timeout=60, what="hub generation 1")
        wait_until(lambda: {"segmentation", "correction"}
                   <= {r.kind for _, r in hub.service.metric_records()},
                   timeout=30, what="metrics at the hub")
    finally:
        node.stop()
        if proxy is not None:
            proxy.close()
            plain.stop(grace=0.5)

    assert {"Enrol", "WatchGenerations", "DownloadGeneration", "UploadUpdate",
            "ReportMetrics"} <= wire.methods()
    captures = {"interceptor": wire.everything()}
    if proxy is not None:
        captures["proxy"] = bytes(proxy.sent)
        assert len(captures["proxy"]) >= len(wire.requests("UploadUpdate")[-1])
    # Both captures see the plaintext of what went (else the search below proves nothing).
    chunk = next(r for r in wire.requests("UploadUpdate")[1:] if len(r) > 2000)
    for sent in captures.values():
        assert chunk[1000:1064] in sent
    values, runs = _secrets(study, seg_path)
    assert values and runs
    for where, sent in captures.items():
        for value in values:
            assert value not in sent, f"{value!r} went to the hub ({where})"
        for run in runs:
            assert run not in sent, f"pixel bytes went to the hub ({where})"
    # The check can fail: the correction's Dice did go, as plain numbers.
    corrections = [r for _, r in hub.service.metric_records("correction")]
    assert corrections and all(np.isfinite(v) for r in corrections for v in r.values.values())
    # ... paired with the segmentation's metrics by the node's opaque sequence number.
    seqs = {r.values.get("segmentation_seq") for _, r in hub.service.metric_records("segmentation")}
    assert all(r.values["segmentation_seq"] in seqs and "mean_entropy" in r.values
               for r in corrections)
