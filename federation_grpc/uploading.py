"""A node's updates to the hub: chunked, resumable, idempotent by update id.

:func:`upload_update` sends an update's safetensors bytes until the hub holds all of
them. Each attempt first asks the hub how many bytes it holds for the update id and sends
only the rest, so a call repeated after a crash (or an interrupted stream) resumes; an
update the hub already has is not sent again. The chunks are framed by hand
(:mod:`federation_grpc.wire`): one copy of the payload, not three.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from federation_grpc import wire
from federation_grpc._proto import federation_pb2 as pb
from federation_grpc.connection import CallSettings, is_transient, refusal
from federation_grpc.errors import HubUnavailable
from federation_grpc.hub.domain import UpdateHeader, UploadState, UploadStatus
from federation_grpc.hub.serde import header_to_proto, upload_status_from_proto

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateMetadata:
    """What the node says about an update; the payload is safetensors bytes."""

    update_id: str
    base_generation: int
    num_samples: int
    trained_groups: tuple[str, ...]
    local_metrics: dict[str, float] = field(default_factory=dict)
    # The payload's sha256 when the node kept it from writing the update (its bytes on
    # disk are then checked against it by the hub); None: hashed before sending.
    sha256: str | None = None


def open_upload(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable:
    """The hub's upload method on ``channel``, taking hand-framed chunks."""
    return channel.stream_unary(
        wire.UPLOAD_METHOD,
        request_serializer=wire.serialize_upload_request,
        response_deserializer=pb.UploadUpdateResponse.FromString,
    )


def upload_update(
    upload_call: grpc.StreamUnaryMultiCallable,
    status_of: Callable[[str], UploadStatus],
    settings: CallSettings,
    chunk_size: int,
    payload: bytes,
    meta: UpdateMetadata,
    on_chunk: Callable[[int], None] | None = None,
) -> UploadStatus:
    """Upload an update until the hub holds all of it; safe to call again after a crash.

    ``status_of`` asks the hub what it holds of an update id, before an attempt after an
    interrupted one.

    Raises
    ------
    FederationError
        The hub refused the upload (the subclass of its gRPC code).
    HubUnavailable
        The upload was not complete after ``settings.retry.attempts`` attempts.
    """
    sha = meta.sha256 or hashlib.sha256(payload).hexdigest()
    last: grpc.RpcError | None = None
    # The first attempt sends from byte 0 without asking: the hub answers the header of
    # an update it already holds (partly) with its status, and the next attempt resumes
    # from there. One call per update instead of two when nothing was sent before.
    known: UploadStatus | None = UploadStatus(meta.update_id, UploadState.UNKNOWN)
    for attempt in range(settings.retry.attempts):
        status = known if known is not None else status_of(meta.update_id)
        known = None
        if status.state in (UploadState.RECEIVED, UploadState.MERGED, UploadState.REJECTED):
            return status
        offset = status.received_bytes if status.state == UploadState.PARTIAL else 0
        header = _header(meta, len(payload), sha, offset)
        try:
            response = upload_call(
                upload_messages(payload, header, chunk_size, on_chunk),
                metadata=settings.metadata,
                timeout=settings.timeout_s,
            )
        except grpc.RpcError as error:
            if not is_transient(error):
                raise refusal(error) from error
            last = error
            delay = settings.retry.delay(attempt)
            LOGGER.warning(
                "upload %s interrupted (%s) at attempt %d; resuming in %.1fs",
                meta.update_id,
                error.code().name,  # type: ignore[attr-defined]
                attempt + 1,
                delay,
            )
            time.sleep(delay)
            continue
        result = upload_status_from_proto(response)
        if result.state != UploadState.PARTIAL:
            return result
        known = result  # where the hub stands: the next attempt resumes there
    raise HubUnavailable(
        f"upload {meta.update_id}: not complete after {settings.retry.attempts} attempts"
    ) from last


def _header(meta: UpdateMetadata, total_size: int, sha256: str, offset: int) -> UpdateHeader:
    return UpdateHeader(
        update_id=meta.update_id,
        base_generation=meta.base_generation,
        num_samples=meta.num_samples,
        trained_groups=tuple(meta.trained_groups),
        local_metrics=dict(meta.local_metrics),
        total_size=total_size,
        sha256=sha256,
        offset=offset,
    )


def upload_messages(
    payload: bytes,
    header: UpdateHeader,
    chunk_size: int,
    on_chunk: Callable[[int], None] | None,
) -> Iterator[wire.UploadPart]:
    """The header, then ``payload`` from ``header.offset`` in chunks of ``chunk_size``."""
    yield pb.UploadUpdateRequest(header=header_to_proto(header))
    view = memoryview(payload)
    for start in range(header.offset, len(payload), chunk_size):
        end = min(start + chunk_size, len(payload))
        yield view[start:end]
        if on_chunk is not None:
            on_chunk(end)
