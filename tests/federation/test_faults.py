"""Faults: the hub process is SIGKILLed mid-upload and restarted; the update merges once."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from federation_grpc.client import FederationClient
from federation_grpc.connection import ClientTls, RetryPolicy
from federation_grpc.hub.config import load_config
from federation_grpc.hub.domain import UploadState
from federation_grpc.hub.service import HubService
from federation_grpc.uploading import UpdateMetadata

from .conftest import ALL_GROUPS, MODEL_CONFIG, nudged, small_model
from .hubproc import HubProcess, write_config

CHUNK = 64 * 1024


def big_model() -> dict[str, np.ndarray]:
    model = small_model()
    model["encoder.big"] = np.random.default_rng(5).normal(size=(750_000,)).astype(np.float32)
    return model


def wait_for(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_hub_killed_mid_upload_resumes_and_merges_exactly_once(tmp_path: Path, certs) -> None:  # type: ignore[no-untyped-def]
    config_path = write_config(tmp_path / "hub.toml", tmp_path / "data", certs)
    setup = HubService(load_config(config_path))
    setup.init_model(save(big_model()), MODEL_CONFIG)
    token, _ = setup.create_enrolment_token()
    setup.close()
    staging = tmp_path / "data" / "staging"

    hub = HubProcess(config_path, tmp_path / "hub.log")
    port = hub.port
    client = FederationClient(
        f"127.0.0.1:{port}",
        tls=ClientTls.from_files(certs["ca"].cert, certs["node1"].cert, certs["node1"].key),
        retry=RetryPolicy(attempts=12, initial_backoff_s=0.2, max_backoff_s=2.0),
        chunk_size=CHUNK,
        timeout_s=60,
    )
    client.enrol(token, "site A")
    payload = save(nudged(big_model(), ALL_GROUPS))
    meta = UpdateMetadata(str(uuid.uuid4()), 0, 12, ALL_GROUPS, {"dice.liver": 0.87})
    staged = staging / f"{meta.update_id}.part"
    after_kill: list[int] = []
    killed_at: list[int] = []

    def crash_once(offset: int) -> None:
        if killed_at:
            after_kill.append(offset)
            return
        if offset < len(payload) // 2:
            return
        # Let the hub write some of the update to disk, then kill it without warning.
        wait_for(lambda: staged.exists() and staged.stat().st_size >= len(payload) // 4, 20)
        killed_at.append(staged.stat().st_size if staged.exists() else 0)
        hub.kill()
        restarted.append(HubProcess(config_path, tmp_path / "hub.log", port=port))

    restarted: list[HubProcess] = []
    try:
        status = client.upload(payload, meta, on_chunk=crash_once)
        assert killed_at and killed_at[0] >= len(payload) // 4, "the hub died mid-upload"
        assert status.state in (UploadState.RECEIVED, UploadState.MERGED), status
        # The resumed attempt started at the offset the restarted hub reported, not at 0.
        assert min(after_kill) > killed_at[0], f"resent from {min(after_kill)}"
        assert after_kill[-1] == len(payload)
        assert wait_for(lambda: client.upload_status(meta.update_id).state == UploadState.MERGED)
        again = client.upload(payload, meta)
        assert again.state == UploadState.MERGED and again.merged_into == 1
    finally:
        client.close()
        for proc in restarted:
            proc.stop()
        hub.stop()
    check = HubService(load_config(config_path))
    generations = check.list_generations()
    assert [g.number for g in generations] == [0, 1]
    assert generations[1].update_ids == (meta.update_id,)
    assert not any(staging.iterdir())
    check.close()
