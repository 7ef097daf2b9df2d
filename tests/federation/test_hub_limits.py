"""Hub limits and identity over mTLS (issue 22 item 5): a per-node cap on calls in
flight, and node tokens bound to the client certificate they were enrolled over."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from federation_grpc._proto import federation_pb2 as pb
from federation_grpc.hub.admission import certificate_sha256
from federation_grpc.hub.cli import hub_app

from .conftest import RunningHub
from .test_security import raw_stub


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def status_request() -> pb.GetUploadStatusRequest:
    return pb.GetUploadStatusRequest(update_id=str(uuid.uuid4()))


def open_watch(stub, token: str):  # type: ignore[no-untyped-def]
    """A WatchGenerations stream that the hub has started serving (generation 0 seen)."""
    call = stub.WatchGenerations(
        pb.WatchGenerationsRequest(known_generation=-1), metadata=auth(token), timeout=60
    )
    assert next(call).generation.number == 0
    return call


def test_one_node_cannot_hold_more_than_its_cap_of_streams(  # type: ignore[no-untyped-def]
    start_hub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="federation_grpc.hub.admission")
    hub: RunningHub = start_hub(limits={"max_calls_per_node": 4})
    node1 = hub.enrolled_client(who="node1")
    node2 = hub.enrolled_client(who="node2")
    stub1, stub2 = raw_stub(hub, "node1"), raw_stub(hub, "node2")
    streams = [open_watch(stub1, node1.node_token) for _ in range(4)]

    extra = stub1.WatchGenerations(
        pb.WatchGenerationsRequest(known_generation=-1), metadata=auth(node1.node_token),
        timeout=10,
    )
    with pytest.raises(grpc.RpcError) as refused:
        next(extra)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_calls_per_node" in (refused.value.details() or "")
    # Plain RPCs count too: node1 is at its cap ...
    with pytest.raises(grpc.RpcError) as also:
        stub1.GetUploadStatus(status_request(), metadata=auth(node1.node_token), timeout=10)
    assert also.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    refusals = [r for r in caplog.records if "max_calls_per_node" in r.message]
    assert len(refusals) == 1, "refusals are logged, one line per node per minute"
    # ... while another node is served as usual, streams included.
    answer = stub2.GetUploadStatus(status_request(), metadata=auth(node2.node_token), timeout=10)
    assert answer.state == pb.UPDATE_STATE_UNKNOWN
    other = open_watch(stub2, node2.node_token)

    # A closed stream gives its slot back.
    streams.pop().cancel()
    deadline = time.monotonic() + 30
    while True:
        try:
            stub1.GetUploadStatus(status_request(), metadata=auth(node1.node_token), timeout=10)
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the cancelled stream's slot never came back"
            time.sleep(0.05)
    for call in [*streams, other]:
        call.cancel()
    node1.close()
    node2.close()


def test_a_token_over_another_nodes_certificate_is_refused(hub: RunningHub) -> None:
    node1 = hub.enrolled_client(who="node1")
    node2 = hub.enrolled_client(who="node2")
    stub1, stub2 = raw_stub(hub, "node1"), raw_stub(hub, "node2")
    assert stub1.GetUploadStatus(
        status_request(), metadata=auth(node1.node_token), timeout=10
    ).state == pb.UPDATE_STATE_UNKNOWN
    with pytest.raises(grpc.RpcError) as refused:
        stub2.GetUploadStatus(status_request(), metadata=auth(node1.node_token), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "bound to another client certificate" in (refused.value.details() or "")
    with pytest.raises(grpc.RpcError) as stream_refused:
        next(stub2.WatchGenerations(pb.WatchGenerationsRequest(known_generation=-1),
                                    metadata=auth(node1.node_token), timeout=10))
    assert stream_refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    fingerprints = {n.node_id: n.cert_sha256 for n in hub.service.list_nodes()}
    assert set(fingerprints.values()) == {
        certificate_sha256(hub.certs[who].cert.read_bytes()) for who in ("node1", "node2")
    }
    node1.close()
    node2.close()


def test_a_node_enrolled_without_a_certificate_is_bound_at_its_first_call(
    hub: RunningHub,
) -> None:
    token, _ = hub.service.create_enrolment_token()
    enrolment = hub.service.enrol(token, "enrolled in process")  # as before the binding
    stub1, stub2 = raw_stub(hub, "node1"), raw_stub(hub, "node2")
    stub1.GetUploadStatus(status_request(), metadata=auth(enrolment.node_token), timeout=10)
    with pytest.raises(grpc.RpcError) as refused:
        stub2.GetUploadStatus(status_request(), metadata=auth(enrolment.node_token), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_rebind_moves_a_node_to_its_renewed_certificate(hub: RunningHub, tmp_path: Path) -> None:
    node1 = hub.enrolled_client(who="node1")
    node_id = hub.service.list_nodes()[0].node_id
    config = tmp_path / "hub.toml"
    config.write_text(f'[hub]\ndata_dir = "{hub.service.config.data_dir}"\n')
    runner = CliRunner(env={"COLUMNS": "300"})
    # node2's certificate stands in for node1's renewed one.
    renewed = hub.certs["node2"].cert
    result = runner.invoke(hub_app, ["rebind", node_id, "--cert", str(renewed),
                                     "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert certificate_sha256(renewed.read_bytes()) in result.output
    old, new = raw_stub(hub, "node1"), raw_stub(hub, "node2")
    assert new.GetUploadStatus(status_request(), metadata=auth(node1.node_token),
                               timeout=10).state == pb.UPDATE_STATE_UNKNOWN
    with pytest.raises(grpc.RpcError) as refused:
        old.GetUploadStatus(status_request(), metadata=auth(node1.node_token), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = runner.invoke(hub_app, ["nodes", "--config", str(config)])
    assert certificate_sha256(renewed.read_bytes())[:16] in listed.output
    bad = runner.invoke(hub_app, ["rebind", node_id, "--cert", str(config),
                                  "--config", str(config)])
    assert bad.exit_code == 2 and "not a PEM certificate" in bad.output
    node1.close()


def test_a_database_from_before_the_binding_is_upgraded_and_binds_at_first_use(
    tmp_path: Path,
) -> None:
    from sqlalchemy import create_engine, text

    from federation_grpc.errors import PermissionDenied
    from federation_grpc.hub.nodes import hash_token
    from federation_grpc.hub.service import HubService
    from federation_grpc.hub.store import MIGRATIONS
    from federation_grpc.schema import migrate

    from .conftest import hub_config

    config = hub_config(tmp_path)
    config.data_dir.mkdir(parents=True)
    engine = create_engine(config.resolved_database_url)
    assert migrate(engine, MIGRATIONS, "0001")[1] == "0001"
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO nodes (node_id, display_name, token_sha256, enrolled_at, revoked) "
            "VALUES ('node-old', 'old site', :t, '2026-11-01 00:00:00', 0)"),
            {"t": hash_token("old-token")})
    engine.dispose()
    service = HubService(config)  # upgrades the schema to the head
    try:
        assert service.list_nodes()[0].cert_sha256 == ""
        assert service.authenticate("old-token", "ab" * 32) == "node-old"
        assert service.list_nodes()[0].cert_sha256 == "ab" * 32
        with pytest.raises(PermissionDenied, match="another client certificate"):
            service.authenticate("old-token", "cd" * 32)
    finally:
        service.close()


def test_without_tls_the_cap_counts_per_node_token(tmp_path: Path) -> None:
    """On an insecure loopback hub (tests, the demo) every node has the same address."""
    from dataclasses import replace

    from safetensors.numpy import save

    from federation_grpc._proto import federation_pb2_grpc
    from federation_grpc.hub.process import HubServer
    from federation_grpc.hub.service import HubService

    from .conftest import MODEL_CONFIG, enrol, hub_config, small_model

    config = hub_config(tmp_path)
    config = replace(config, limits=replace(config.limits, max_calls_per_node=2))
    service = HubService(config)
    service.init_model(save(small_model()), MODEL_CONFIG)
    server = HubServer(config, service, insecure_loopback=True, watch_poll_s=0.2).start()
    try:
        stub = federation_pb2_grpc.FederationStub(
            grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        tokens = []
        for name in ("a", "b"):
            token, _ = service.create_enrolment_token()
            tokens.append(service.enrol(token, name).node_token)
        streams = [open_watch(stub, token) for token in tokens for _ in range(2)]
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.WatchGenerations(pb.WatchGenerationsRequest(known_generation=-1),
                                       metadata=auth(tokens[0]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in streams:
            call.cancel()
        assert enrol(service)  # the service itself is unaffected
    finally:
        server.stop(grace=0.5)
        service.close()
