"""The hub over a real socket with mutual TLS: the node client end to end."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors.numpy import load, save

from federation_grpc._proto import admin_pb2, admin_pb2_grpc
from federation_grpc.hub.domain import UploadState
from federation_grpc.uploading import UpdateMetadata

from .conftest import ALL_GROUPS, RunningHub, nudged, small_model


def meta(groups=ALL_GROUPS, base: int = 0, samples: int = 8) -> UpdateMetadata:  # type: ignore[no-untyped-def]
    return UpdateMetadata(str(uuid.uuid4()), base, samples, tuple(groups), {"dice.liver": 0.8})


def test_enrol_upload_watch_download_round_trip(hub: RunningHub) -> None:
    client = hub.enrolled_client()
    stop = threading.Event()
    seen = []

    def watch() -> None:
        for generation in client.watch(known_generation=-1, stop=stop):
            seen.append(generation.number)
            if generation.number == 1:
                stop.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    payload = save(nudged(small_model(), ALL_GROUPS))
    update = meta()
    status = client.upload(payload, update)
    assert status.state in (UploadState.RECEIVED, UploadState.MERGED)
    watcher.join(timeout=30)
    assert seen == [0, 1]
    data = client.download(1)
    merged = load(data)
    assert set(merged) == set(small_model())
    generation = hub.service.generation(1)
    assert generation.update_ids == (update.update_id,)
    again = client.upload(payload, update)
    assert again.state == UploadState.MERGED and again.merged_into == 1
    assert [g.number for g in hub.service.list_generations()] == [0, 1]
    client.close()


def test_health_and_reflection_are_registered(hub: RunningHub) -> None:
    client = hub.client()
    health = health_pb2_grpc.HealthStub(client.channel)
    response = health.Check(
        health_pb2.HealthCheckRequest(service="tessera.federation.v1.Federation")
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"tessera.federation.v1.Federation", "tessera.federation.v1.Admin"} <= names
    client.close()


def test_admin_rpcs_need_the_admin_token(hub: RunningHub) -> None:
    node = hub.enrolled_client()
    channel = hub.client().channel
    admin = admin_pb2_grpc.AdminStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        admin.ListNodes(admin_pb2.ListNodesRequest(), metadata=(("authorization", "Bearer nope"),))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    auth = (("authorization", "Bearer admin-secret"),)
    nodes = admin.ListNodes(admin_pb2.ListNodesRequest(), metadata=auth).nodes
    assert len(nodes) == 1
    generations = admin.ListGenerations(admin_pb2.ListGenerationsRequest(), metadata=auth)
    assert [g.number for g in generations.generations] == [0]
    with pytest.raises(grpc.RpcError) as missing:
        admin.PromoteGeneration(admin_pb2.PromoteGenerationRequest(generation=7), metadata=auth)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    admin.RevokeNode(admin_pb2.RevokeNodeRequest(node_id=nodes[0].node_id), metadata=auth)
    from federation_grpc.errors import PermissionDenied

    with pytest.raises(PermissionDenied):
        node.report_metrics([])
    node.close()


def test_metrics_are_numbers_only(hub: RunningHub) -> None:
    from federation_grpc.errors import InvalidRequest
    from federation_grpc.hub.domain import MetricRecord

    client = hub.enrolled_client()
    record = MetricRecord("segmentation", 0, {"dice.liver": 0.91, "entropy": 0.2})
    assert client.report_metrics([record]) == 1
    with pytest.raises(InvalidRequest):
        client.report_metrics([MetricRecord("segmentation", 0, {"PatientName Doe^John": 1.0})])
    with pytest.raises(InvalidRequest):
        client.report_metrics([MetricRecord("segmentation", 0, {"dice": float("nan")})])
    assert [r.values for _, r in hub.service.metric_records()] == [record.values]
    client.close()


def test_a_report_sent_again_is_held_once(hub: RunningHub) -> None:
    """A node retries a report the hub took (its answer lost), or sends it again after a
    crash before its cursor was saved: a keyed record is held once per node and key."""
    from federation_grpc.errors import InvalidRequest
    from federation_grpc.hub.domain import MetricRecord

    first, second = hub.enrolled_client(), hub.enrolled_client()
    report = [MetricRecord("segmentation", 0, {"dice.liver": 0.9}, "segmentation:1"),
              MetricRecord("correction", 0, {"dice.liver": 0.7}, "correction:1"),
              MetricRecord("segmentation", 0, {"dice.liver": 0.8})]  # no key: always kept
    assert first.report_metrics(report) == 3
    assert first.report_metrics(report) == 3  # the call again
    repeated = MetricRecord("segmentation", 0, {"dice.liver": 0.5}, "segmentation:2")
    assert first.report_metrics([repeated, repeated]) == 2  # a key twice in one call
    assert second.report_metrics(report[:1]) == 1  # keys are per node
    held = [(node, r.key) for node, r in hub.service.metric_records()]
    assert sorted(key for _, key in held) == sorted(
        ["segmentation:1", "correction:1", "", "", "segmentation:2", "segmentation:1"])
    assert len({(node, key) for node, key in held if key}) == 4
    with pytest.raises(InvalidRequest, match="is not a short identifier"):
        first.report_metrics([MetricRecord("segmentation", 0, {}, "Doe^John 1970")])
    first.close()
    second.close()


def big_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    model = small_model()
    model["encoder.big"] = rng.normal(size=(600_000,)).astype(np.float32)  # ~2.4 MB
    return model


def test_download_resumes_from_a_partial_file(start_hub, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hub = start_hub(big_model())
    client = hub.enrolled_client(chunk_size=64 * 1024)
    full = client.download(0)
    target = tmp_path / "gen0.safetensors"
    # A node killed mid-download left the first part behind.
    half = len(full) // 2
    target.with_name(target.name + ".part").write_bytes(full[:half])
    offsets: list[int] = []
    client.download_to(0, target, on_chunk=offsets.append)
    assert target.read_bytes() == full
    assert offsets[0] == half + 64 * 1024, "the download continued where the part file ended"
    assert offsets[-1] == len(full)
    client.close()


def test_corrupt_partial_download_is_detected_and_discarded(start_hub, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from federation_grpc.downloading import IntegrityError

    hub = start_hub(big_model())
    client = hub.enrolled_client(chunk_size=64 * 1024)
    target = tmp_path / "gen0.safetensors"
    part = target.with_name(target.name + ".part")
    part.write_bytes(b"\0" * 1000)
    with pytest.raises(IntegrityError):
        client.download_to(0, target)
    assert part.stat().st_size == 0 and not target.exists()
    client.download_to(0, target)
    assert target.read_bytes() == hub.service.blobs.get(hub.service.generation(0).sha256)
    client.close()


def test_download_resumes_across_a_hub_restart(start_hub) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from federation_grpc.connection import RetryPolicy
    from federation_grpc.hub.process import HubServer

    hub = start_hub(big_model())
    svc = hub.service
    # Retries that outlast the restart: the port is free only once the old server let go.
    client = hub.enrolled_client(chunk_size=64 * 1024, retry=RetryPolicy(
        attempts=12, initial_backoff_s=0.05, max_backoff_s=1.0))
    expected = svc.blobs.get(svc.generation(0).sha256)
    stopped = threading.Event()
    gone: list[threading.Event] = []
    offsets: list[int] = []

    def stop_hub_once(offset: int) -> None:
        offsets.append(offset)
        if not stopped.is_set() and offset >= 4 * 64 * 1024:
            gone.append(hub.server.server.stop(None))
            stopped.set()

    replacement: list[HubServer] = []

    def restart() -> None:
        stopped.wait(30)
        gone[0].wait(30)  # the old server has stopped (its socket may linger a moment)
        config = replace(svc.config, port=hub.server.port)
        deadline = time.monotonic() + 10
        while not replacement:
            try:
                replacement.append(HubServer(config, svc, watch_poll_s=0.2).start())
            except RuntimeError:  # "Failed to bind": the old listener is still closing
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    thread = threading.Thread(target=restart)
    thread.start()
    data = client.download(0, on_chunk=stop_hub_once)
    thread.join(timeout=30)
    assert stopped.is_set() and replacement, "the hub went away mid-download, and came back"
    assert data == expected
    assert offsets == sorted(set(offsets)), "no byte was fetched twice"
    for server in replacement:
        server.stop(grace=0.1)
    client.close()


def test_a_watcher_behind_is_told_of_every_generation_it_missed(hub: RunningHub) -> None:
    """Generations published and replaced before a watcher's next event are named in it
    (``superseded``), oldest first; only the newest comes."""
    client = hub.enrolled_client()
    for number in (1, 2, 3):
        client.upload(save(nudged(small_model(), ALL_GROUPS)), meta(base=number - 1))
        deadline = time.monotonic() + 30
        while hub.service.current_number() != number and time.monotonic() < deadline:
            time.sleep(0.05)
    assert hub.service.current_number() == 3
    stop = threading.Event()
    first = next(iter(client.watch(known_generation=0, stop=stop)))
    stop.set()
    assert (first.number, first.superseded) == (3, (1, 2))
    stop = threading.Event()
    from_one = next(iter(client.watch(known_generation=1, stop=stop)))
    stop.set()
    assert (from_one.number, from_one.superseded) == (3, (2,))
    stop = threading.Event()
    fresh = next(iter(client.watch(known_generation=-1, stop=stop)))
    stop.set()
    assert (fresh.number, fresh.superseded) == (3, ())  # a new node: nothing it missed
    client.close()
