"""Only the allowed get in; malformed uploads get INVALID_ARGUMENT and leave nothing."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import save

from federation_grpc._proto import federation_pb2 as pb
from federation_grpc._proto import federation_pb2_grpc
from federation_grpc.errors import FailedPrecondition
from federation_grpc.hub.process import HubServer
from federation_grpc.hub.store import UpdateRow

from .conftest import ALL_GROUPS, RunningHub, hub_config, nudged, small_model


def raw_stub(hub: RunningHub, who: str = "node1") -> federation_pb2_grpc.FederationStub:
    tls = hub.tls(who)
    credentials = grpc.ssl_channel_credentials(tls.ca_cert, tls.key, tls.cert)
    return federation_pb2_grpc.FederationStub(grpc.secure_channel(hub.target, credentials))


def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value.code()


def test_no_client_certificate_is_refused_in_the_handshake(hub: RunningHub) -> None:
    credentials = grpc.ssl_channel_credentials(hub.certs["ca"].cert.read_bytes())
    stub = federation_pb2_grpc.FederationStub(grpc.secure_channel(hub.target, credentials))
    call = lambda: stub.Enrol(pb.EnrolRequest(enrolment_token="x"), timeout=10)  # noqa: E731
    assert code_of(call) == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(hub: RunningHub) -> None:
    stub = raw_stub(hub, who="stranger")
    call = lambda: stub.Enrol(pb.EnrolRequest(enrolment_token="x"), timeout=10)  # noqa: E731
    assert code_of(call) == grpc.StatusCode.UNAVAILABLE


def test_tokens_missing_unknown_and_revoked(hub: RunningHub) -> None:
    stub = raw_stub(hub)
    request = pb.GetUploadStatusRequest(update_id=str(uuid.uuid4()))
    assert code_of(lambda: stub.GetUploadStatus(request, timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    bogus = (("authorization", "Bearer made-up"),)
    assert code_of(lambda: stub.GetUploadStatus(request, metadata=bogus, timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    bad_enrol = pb.EnrolRequest(enrolment_token="guess")
    assert code_of(lambda: stub.Enrol(bad_enrol, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    client = hub.enrolled_client()
    node_id = hub.service.list_nodes()[0].node_id
    auth = (("authorization", f"Bearer {client.node_token}"),)
    assert stub.GetUploadStatus(request, metadata=auth, timeout=10).state == (
        pb.UPDATE_STATE_UNKNOWN
    )
    hub.service.revoke_node(node_id)
    assert code_of(lambda: stub.GetUploadStatus(request, metadata=auth, timeout=10)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    client.close()


def test_insecure_mode_only_on_loopback(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="loopback"):
        HubServer(replace(hub_config(tmp_path), host="0.0.0.0"), insecure_loopback=True)
    with pytest.raises(FailedPrecondition, match="TLS is not configured"):
        HubServer(hub_config(tmp_path))


def _messages(header: pb.UpdateHeader, payload: bytes) -> Iterator[pb.UploadUpdateRequest]:
    yield pb.UploadUpdateRequest(header=header)
    for start in range(0, len(payload), 4096):
        yield pb.UploadUpdateRequest(chunk=payload[start : start + 4096])


def _header(payload: bytes, **overrides: object) -> pb.UpdateHeader:
    fields: dict[str, object] = {
        "update_id": str(uuid.uuid4()),
        "base_generation": 0,
        "num_samples": 4,
        "trained_groups": list(ALL_GROUPS),
        "total_size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    fields.update(overrides)
    return pb.UpdateHeader(**fields)  # type: ignore[arg-type]


def _good() -> dict[str, np.ndarray]:
    return nudged(small_model(), ALL_GROUPS)


def _renamed() -> dict[str, np.ndarray]:
    tensors = _good()
    tensors["encoder.extra.weight"] = np.zeros(3, dtype=np.float32)
    return tensors


def _reshaped() -> dict[str, np.ndarray]:
    tensors = _good()
    tensors["bottleneck.weight"] = np.zeros((5, 4), dtype=np.float32)
    return tensors


def _incomplete() -> dict[str, np.ndarray]:
    tensors = _good()
    del tensors["encoder.conv1.bias"]
    return tensors


CASES = {
    "bad sha256": (save(_good()), {"sha256": "0" * 64}),
    "not safetensors": (b"\x80\x04pickle-ish" * 50, {}),
    "unknown tensor name": (save(_renamed()), {}),
    "wrong shape": (save(_reshaped()), {}),
    "incomplete group": (save(_incomplete()), {}),
    "undeclared group": (save(_good()), {"trained_groups": ["encoder", "bottleneck"]}),
    "oversized": (save(_good()), {"total_size": 10**12}),
    "more bytes than declared": (save(_good()), {"total_size": 100}),
    "not a uuid": (save(_good()), {"update_id": "../../etc/passwd"}),
    "unknown base": (save(_good()), {"base_generation": 42}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_upload_is_invalid_argument_and_nothing_is_stored(
    hub: RunningHub, case: str
) -> None:
    client = hub.enrolled_client()
    stub = raw_stub(hub)
    payload, overrides = CASES[case]
    header = _header(payload, **overrides)
    auth = (("authorization", f"Bearer {client.node_token}"),)
    call = lambda: stub.UploadUpdate(_messages(header, payload), metadata=auth, timeout=10)  # noqa: E731
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    svc = hub.service
    with svc.store.session() as session:
        assert session.query(UpdateRow).count() == 0
    blobs = [p for p in (svc.config.data_dir / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 1, "only generation 0 is stored"
    assert not any((svc.config.data_dir / "staging").iterdir())
    assert svc.current_number() == 0
    client.close()
