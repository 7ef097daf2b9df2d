"""The hub at scale, asserted at a smaller one: a hundred watchers, each its own node,
all told of every generation from one shared read; concurrent SQLite writers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from safetensors.numpy import save
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from federation_grpc._proto import federation_pb2 as pb
from federation_grpc._proto import federation_pb2_grpc
from federation_grpc.hub.process import HubServer
from federation_grpc.hub.service import HubService

from .conftest import MODEL_CONFIG, enrol, hub_config, make_update, small_model, upload

WATCHERS = 100
CHANNELS = 4  # streams are multiplexed: 25 nodes' watches share each connection


@pytest.fixture
def wide_hub(tmp_path: Path) -> Iterator[tuple[HubService, HubServer]]:
    config = hub_config(tmp_path)
    config = replace(config, max_workers=WATCHERS + 16,
                     limits=replace(config.limits, max_calls_per_node=2))
    service = HubService(config)
    service.init_model(save(small_model()), MODEL_CONFIG)
    # Without TLS the per-node cap counts per node token: each watcher is its own node.
    server = HubServer(config, service, insecure_loopback=True, watch_poll_s=5.0,
                       keepalive_s=60.0).start()
    yield service, server
    server.stop(grace=0.5)
    service.close()


def wait_until(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_every_watcher_is_told_of_every_generation_from_one_shared_read(
    wide_hub: tuple[HubService, HubServer],
) -> None:
    service, server = wide_hub
    channels = [grpc.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(CHANNELS)]
    stubs = [federation_pb2_grpc.FederationStub(c) for c in channels]
    tokens = []
    for index in range(WATCHERS):
        token, _ = service.create_enrolment_token()
        tokens.append(service.enrol(token, f"site{index}").node_token)
    seen: list[list[int]] = [[] for _ in tokens]
    calls = [
        stubs[i % CHANNELS].WatchGenerations(
            pb.WatchGenerationsRequest(known_generation=-1),
            metadata=(("authorization", f"Bearer {token}"),), timeout=120)
        for i, token in enumerate(tokens)
    ]

    def follow(index: int) -> None:
        try:
            for event in calls[index]:
                if event.HasField("generation"):
                    seen[index].append(event.generation.number)
        except grpc.RpcError:
            pass  # cancelled at the end

    readers = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(WATCHERS)]
    for reader in readers:
        reader.start()
    try:
        wait_until(lambda: all(s == [0] for s in seen), "every watcher to see generation 0")
        reads = []
        original = service.ledger.state_version

        def counted() -> int:
            reads.append(1)
            return original()

        service.ledger.state_version = counted  # type: ignore[method-assign]
        node = enrol(service)
        published = [0]
        for round_ in range(3):
            reads.clear()
            base = service.generation_tensors(published[-1])
            payload, header = make_update(base, seed=round_ + 2)
            upload(service, node, payload, replace(header, base_generation=published[-1]))
            # The hub's aggregator merges it (FedAsync: one update, one generation).
            update_id = header.update_id
            wait_until(lambda u=update_id: service.uploads.status(node, u).merged_into > 0,
                       "the update to be merged")
            number = service.uploads.status(node, update_id).merged_into
            published.append(number)
            wait_until(lambda: all(s == published for s in seen),
                       f"every watcher to see generation {number}")
            # One read per change for all the streams, not one per stream.
            assert len(reads) < WATCHERS // 10, f"{len(reads)} state reads for one change"
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
    assert all(s == published for s in seen)


def test_concurrent_writers_all_commit_and_leave_the_write_gate_open(
    wide_hub: tuple[HubService, HubServer],
) -> None:
    service, _ = wide_hub
    gate = service.store.write_gate
    assert gate is not None
    errors: list[BaseException] = []

    def enrol_some() -> None:
        try:
            for _ in range(5):
                enrol(service)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=enrol_some) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(service.list_nodes()) == 40
    # A failed write transaction gives the gate back too.
    with pytest.raises(OperationalError), service.store.session() as session:
        session.execute(text("INSERT INTO no_such_table VALUES (1)"))
    assert not gate.lock.locked()
