"""A large update and a generation download over mutual TLS, each killed half-way by a
network failure and resumed from where the hub (or the node) stopped: nothing sent
twice, sha256 checked, and the hub's memory growth far below the payload's size."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from federation_grpc.client import FederationClient
from federation_grpc.connection import ClientTls, RetryPolicy
from federation_grpc.errors import HubUnavailable
from federation_grpc.hub.config import load_config
from federation_grpc.hub.domain import UploadState
from federation_grpc.hub.service import HubService
from federation_grpc.hub.tensorfile import write_tensors
from federation_grpc.uploading import UpdateMetadata

from .cutproxy import CutProxy
from .hubproc import HubProcess, write_config

PAYLOAD_MB = 96
CHUNK = 1 << 20
MODEL_CONFIG = json.dumps({"architecture": "bench", "heads": {"liver": ["liver"]}})


def model(seed: int, step: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    floats = PAYLOAD_MB * (1 << 20) // 4
    out = {"encoder.weight": rng.standard_normal(floats, dtype=np.float32),
           "heads.liver.weight": rng.standard_normal(4096, dtype=np.float32)}
    if step:
        noise = np.random.default_rng(seed)
        for value in out.values():
            value += np.float32(step) * noise.standard_normal(value.shape, dtype=np.float32)
    return out


def blob_sha(tmp_path: Path, generation: int) -> str:
    """The sha256 the hub recorded for a generation (read from its database)."""
    service = HubService(load_config(tmp_path / "hub.toml"))
    try:
        return service.generation(generation).sha256
    finally:
        service.close()


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def hub_and_update(tmp_path: Path, certs) -> tuple[Path, str, bytes, ClientTls]:  # type: ignore[no-untyped-def]
    """A hub's config with generation 0 (from a file, streamed), an enrolment token, an
    update's bytes, and node1's mutual-TLS credentials."""
    config = write_config(tmp_path / "hub.toml", tmp_path / "data", certs)
    write_tensors(tmp_path / "g0.safetensors", model(0))
    setup = HubService(load_config(config))
    setup.init_model(tmp_path / "g0.safetensors", MODEL_CONFIG)
    token, _ = setup.create_enrolment_token()
    setup.close()
    write_tensors(tmp_path / "update.safetensors", model(1, step=0.01))
    payload = (tmp_path / "update.safetensors").read_bytes()
    tls = ClientTls.from_files(certs["ca"].cert, certs["node1"].cert, certs["node1"].key)
    return config, token, payload, tls


def test_update_and_download_resume_after_a_killed_connection(  # type: ignore[no-untyped-def]
    tmp_path: Path, certs
) -> None:
    config, token, payload, tls = hub_and_update(tmp_path, certs)
    size = len(payload)
    retry = RetryPolicy(attempts=8, initial_backoff_s=0.05, max_backoff_s=0.5)
    hub = HubProcess(config, tmp_path / "hub.log")
    up = CutProxy(hub.port, cut_after=size // 2, direction="up")
    down = CutProxy(hub.port, cut_after=size // 2, direction="down")
    try:
        client = FederationClient(up.target, tls=tls, retry=retry, chunk_size=CHUNK)
        client.enrol(token, "big site")
        before = peak_rss_kb(hub.proc.pid)
        meta = UpdateMetadata(str(uuid.uuid4()), 0, 20, ("encoder", "heads.liver"), {})
        status = client.upload(payload, meta)
        assert up.cut.is_set() and up.connections >= 2
        # Resumed, not started over: the bytes that reached the hub add up to the payload
        # plus framing and what was in flight when the connection died, not one and a half.
        assert up.forwarded["up"] < size * 1.25, up.forwarded
        deadline = time.monotonic() + 120
        while status.state != UploadState.MERGED and time.monotonic() < deadline:
            assert status.state in (UploadState.RECEIVED, UploadState.MERGED), status
            time.sleep(0.1)
            status = client.upload_status(meta.update_id)
        assert status.state == UploadState.MERGED
        generation = status.merged_into

        reader = FederationClient(down.target, tls=tls, retry=retry, chunk_size=CHUNK,
                                  node_token=client.node_token)
        target = tmp_path / "downloaded.safetensors"
        reader.download_to(generation, target)  # checks size and sha256 itself
        assert down.cut.is_set() and down.connections >= 2
        assert down.forwarded["down"] < size * 1.25, down.forwarded
        assert hashlib.sha256(target.read_bytes()).hexdigest() == blob_sha(tmp_path, generation)
        grown = peak_rss_kb(hub.proc.pid) - before
        client.close()
        reader.close()
    finally:
        up.close()
        down.close()
        hub.stop()
    # Upload, merge and download of a 96 MB model moved the hub's peak by less than half
    # of it: nothing held the whole payload.
    assert grown < size // 1024 // 2, f"hub peak grew by {grown} kB"


def test_a_node_restarted_mid_upload_resumes_where_the_hub_stopped(  # type: ignore[no-untyped-def]
    tmp_path: Path, certs
) -> None:
    """The node's process dies half-way through an upload (here: its one attempt is cut)
    and a new process sends the update again, starting at byte 0 without asking: the hub
    answers with what it holds and the new process sends only the rest."""
    config, token, payload, tls = hub_and_update(tmp_path, certs)
    size = len(payload)
    hub = HubProcess(config, tmp_path / "hub.log")
    first_run = CutProxy(hub.port, cut_after=size // 2, direction="up")
    second_run = CutProxy(hub.port, cut_after=size * 4, direction="up")  # counts only
    meta = UpdateMetadata(str(uuid.uuid4()), 0, 20, ("encoder", "heads.liver"), {})
    try:
        dying = FederationClient(first_run.target, tls=tls, chunk_size=CHUNK,
                                 retry=RetryPolicy(attempts=1))
        dying.enrol(token, "restarting site")
        with pytest.raises(HubUnavailable):
            dying.upload(payload, meta)
        dying.close()
        asking = FederationClient(f"127.0.0.1:{hub.port}", tls=tls, node_token=dying.node_token)
        held = asking.upload_status(meta.update_id)
        asking.close()
        assert held.state == UploadState.PARTIAL and 0 < held.received_bytes < size
        restarted = FederationClient(second_run.target, tls=tls, chunk_size=CHUNK,
                                     node_token=dying.node_token,
                                     retry=RetryPolicy(attempts=4, initial_backoff_s=0.05))
        status = restarted.upload(payload, meta)
        restarted.close()
        assert status.state in (UploadState.RECEIVED, UploadState.MERGED), status
        # What went up the second time: the rest, plus framing and the chunks in flight
        # when the hub answered the first header; not the whole payload again.
        assert second_run.forwarded["up"] < size - held.received_bytes + size // 4, (
            second_run.forwarded, held)
    finally:
        first_run.close()
        second_run.close()
        hub.stop()
