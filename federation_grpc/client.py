"""Node-side federation client: bytes and metadata in, bytes out.

Everything a node does with the hub goes through ``FederationClient``: enrol, watch for
new generations (reconnecting), download a generation (resuming by offset, sha256
checked), upload an update (resuming from the offset the hub reports, idempotent by
update id), report de-identified metrics, and take part in federated evaluation.
Transient failures are retried with exponential backoff and jitter; a refusal (bad
request, bad credentials) is raised at once as a ``FederationError``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from federation_grpc import wire
from federation_grpc._proto import federation_pb2 as pb
from federation_grpc._proto import federation_pb2_grpc
from federation_grpc.errors import (
    FailedPrecondition,
    FederationError,
    HubUnavailable,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from federation_grpc.hub.domain import (
    EvaluationTaskView,
    MetricRecord,
    UpdateHeader,
    UploadState,
    UploadStatus,
)
from federation_grpc.hub.serde import (
    header_to_proto,
    metric_record_to_proto,
    upload_status_from_proto,
)

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)
_ERRORS: dict[grpc.StatusCode, type[FederationError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}
_MAX_MESSAGE_BYTES = 5 * 1024 * 1024
__all__ = [
    "ClientTls",
    "FederationClient",
    "Generation",
    "IntegrityError",
    "MetricRecord",
    "RetryPolicy",
    "UpdateMetadata",
    "UploadState",
    "UploadStatus",
]


@dataclass(frozen=True)
class ClientTls:
    """PEM bytes: the federation CA, this node's certificate and key."""

    ca_cert: bytes
    cert: bytes
    key: bytes

    @classmethod
    def from_files(cls, ca_cert: Path, cert: Path, key: Path) -> ClientTls:
        return cls(ca_cert.read_bytes(), cert.read_bytes(), key.read_bytes())


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 30.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt)
        return base * (0.5 + random.random() / 2)  # jitter spreads reconnecting nodes


@dataclass(frozen=True)
class Generation:
    number: int
    parent: int
    sha256: str
    size_bytes: int
    config_json: str
    status: str
    update_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpdateMetadata:
    """What the node says about an update; the payload is safetensors bytes."""

    update_id: str
    base_generation: int
    num_samples: int
    trained_groups: tuple[str, ...]
    local_metrics: dict[str, float] = field(default_factory=dict)


def _generation(message: pb.GenerationInfo) -> Generation:
    return Generation(
        number=message.number,
        parent=message.parent,
        sha256=message.sha256,
        size_bytes=message.size_bytes,
        config_json=message.config_json,
        status=message.status,
        update_ids=tuple(message.update_ids),
    )


def _refusal(error: grpc.RpcError) -> FederationError:
    code = error.code()  # type: ignore[attr-defined]
    details = error.details()  # type: ignore[attr-defined]
    return _ERRORS.get(code, FederationError)(f"{code.name}: {details}")


class FederationClient:
    """One node's connection to the hub. Thread-safe for concurrent calls."""

    def __init__(
        self,
        target: str,
        *,
        tls: ClientTls | None = None,
        node_token: str = "",
        insecure: bool = False,
        retry: RetryPolicy | None = None,
        chunk_size: int = 1024 * 1024,
        timeout_s: float = 120.0,
        server_name: str | None = None,
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor
                               | grpc.UnaryStreamClientInterceptor
                               | grpc.StreamUnaryClientInterceptor
                               | grpc.StreamStreamClientInterceptor] = (),
    ) -> None:
        if tls is None and not insecure:
            raise ValueError("give tls credentials, or insecure=True for a loopback test hub")
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls is not None:
            credentials = grpc.ssl_channel_credentials(tls.ca_cert, tls.key, tls.cert)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        if interceptors:  # every call goes through them, the hand-framed upload too
            self.channel = grpc.intercept_channel(self.channel, *interceptors)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)
        # Chunks are framed by hand (federation_grpc.wire): one copy, not three.
        self._upload_call = self.channel.stream_unary(
            wire.UPLOAD_METHOD,
            request_serializer=wire.serialize_upload_request,
            response_deserializer=pb.UploadUpdateResponse.FromString,
        )
        self.node_token = node_token
        self.retry = retry or RetryPolicy()
        self.chunk_size = chunk_size
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> FederationClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.node_token}"),) if self.node_token else ()

    def _call(self, what: str, attempt_fn: Callable[[], T]) -> T:
        """Run ``attempt_fn`` with retries on transient failures."""
        last: grpc.RpcError | None = None
        for attempt in range(self.retry.attempts):
            try:
                return attempt_fn()
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE:  # type: ignore[attr-defined]
                    raise _refusal(error) from error
                last = error
                delay = self.retry.delay(attempt)
                LOGGER.warning(
                    "%s failed (%s), retry %d/%d in %.1fs",
                    what,
                    error.code().name,  # type: ignore[attr-defined]
                    attempt + 1,
                    self.retry.attempts,
                    delay,
                )
                time.sleep(delay)
        raise HubUnavailable(
            f"{what}: hub unreachable after {self.retry.attempts} attempts"
        ) from last

    # --- enrolment ----------------------------------------------------------------------

    def enrol(self, enrolment_token: str, display_name: str = "") -> tuple[str, str]:
        """Trade a one-time enrolment token for ``(node_id, node_token)``; keeps the token."""
        request = pb.EnrolRequest(enrolment_token=enrolment_token, display_name=display_name)
        response = self._call("enrol", lambda: self.stub.Enrol(request, timeout=self.timeout_s))
        self.node_token = response.node_token
        return response.node_id, response.node_token

    # --- generations --------------------------------------------------------------------

    def watch(
        self, known_generation: int = -1, stop: threading.Event | None = None
    ) -> Iterator[Generation]:
        """Yield each new current generation; reconnects (with backoff) until ``stop`` is set."""
        stop = stop or threading.Event()
        known = known_generation
        failures = 0
        while not stop.is_set():
            call = self.stub.WatchGenerations(
                pb.WatchGenerationsRequest(known_generation=known), metadata=self._metadata()
            )
            cancel_on_stop = threading.Thread(
                target=lambda c=call: (stop.wait(), c.cancel()), daemon=True
            )
            cancel_on_stop.start()
            try:
                for event in call:
                    failures = 0
                    if event.HasField("generation") and event.generation.number != known:
                        known = event.generation.number
                        yield _generation(event.generation)
            except grpc.RpcError as error:
                if stop.is_set():
                    return
                if error.code() not in RETRYABLE:  # type: ignore[attr-defined]
                    raise _refusal(error) from error
                delay = self.retry.delay(min(failures, 10))
                failures += 1
                LOGGER.info(
                    "watch interrupted (%s); reconnecting in %.1fs", error.code().name, delay
                )  # type: ignore[attr-defined]
                stop.wait(delay)
            finally:
                call.cancel()

    def download(self, generation: int, on_chunk: Callable[[int], None] | None = None) -> bytes:
        """The generation's safetensors bytes, resuming by offset across failures."""
        sink = _MemorySink()
        self._download_into(generation, sink, on_chunk)
        return bytes(sink.buffer)

    def download_to(
        self, generation: int, path: Path, on_chunk: Callable[[int], None] | None = None
    ) -> Path:
        """Download into ``path``; a ``path.part`` left by an interrupted run is resumed."""
        sink = _FileSink(path.with_name(path.name + ".part"))
        try:
            self._download_into(generation, sink, on_chunk)
        finally:
            sink.close()
        os.replace(sink.path, path)
        return path

    def _download_into(
        self, generation: int, sink: _Sink, on_chunk: Callable[[int], None] | None
    ) -> None:
        seen: dict[str, Any] = {}

        def attempt() -> None:
            request = pb.DownloadGenerationRequest(
                generation=generation, offset=sink.size(), chunk_size=self.chunk_size
            )
            for chunk in self.stub.DownloadGeneration(
                request, metadata=self._metadata(), timeout=self.timeout_s
            ):
                if chunk.offset != sink.size():
                    raise IntegrityError(f"hub sent offset {chunk.offset}, expected {sink.size()}")
                seen.update(total=chunk.total_size, sha256=chunk.sha256)
                if chunk.data:
                    sink.write(chunk.data)
                    if on_chunk is not None:
                        on_chunk(sink.size())

        self._call(f"download generation {generation}", attempt)
        if sink.size() != seen.get("total"):
            raise HubUnavailable(f"download of generation {generation} ended early")
        if sink.sha256() != seen["sha256"]:
            sink.reset()
            raise IntegrityError(f"sha256 of generation {generation} does not match; discarded")

    # --- updates ------------------------------------------------------------------------

    def upload_status(self, update_id: str) -> UploadStatus:
        request = pb.GetUploadStatusRequest(update_id=update_id)
        response = self._call(
            "upload status",
            lambda: self.stub.GetUploadStatus(
                request, metadata=self._metadata(), timeout=self.timeout_s
            ),
        )
        return upload_status_from_proto(response)

    def upload(
        self,
        payload: bytes,
        meta: UpdateMetadata,
        on_chunk: Callable[[int], None] | None = None,
    ) -> UploadStatus:
        """Upload an update until the hub holds all of it; safe to call again after a crash.

        Each attempt first asks the hub how many bytes it holds for ``meta.update_id`` and
        sends only the rest; an update the hub already has is not sent again.
        """
        sha = hashlib.sha256(payload).hexdigest()
        last: grpc.RpcError | None = None
        for attempt in range(self.retry.attempts):
            status = self.upload_status(meta.update_id)
            if status.state in (UploadState.RECEIVED, UploadState.MERGED, UploadState.REJECTED):
                return status
            offset = status.received_bytes if status.state == UploadState.PARTIAL else 0
            header = UpdateHeader(
                update_id=meta.update_id,
                base_generation=meta.base_generation,
                num_samples=meta.num_samples,
                trained_groups=tuple(meta.trained_groups),
                local_metrics=dict(meta.local_metrics),
                total_size=len(payload),
                sha256=sha,
                offset=offset,
            )
            try:
                response = self._upload_call(
                    self._upload_messages(payload, header, on_chunk),
                    metadata=self._metadata(),
                    timeout=self.timeout_s,
                )
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE:  # type: ignore[attr-defined]
                    raise _refusal(error) from error
                last = error
                delay = self.retry.delay(attempt)
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
        raise HubUnavailable(
            f"upload {meta.update_id}: not complete after {self.retry.attempts} attempts"
        ) from last

    def _upload_messages(
        self, payload: bytes, header: UpdateHeader, on_chunk: Callable[[int], None] | None
    ) -> Iterator[wire.UploadPart]:
        yield pb.UploadUpdateRequest(header=header_to_proto(header))
        view = memoryview(payload)
        for start in range(header.offset, len(payload), self.chunk_size):
            end = min(start + self.chunk_size, len(payload))
            yield view[start:end]
            if on_chunk is not None:
                on_chunk(end)

    # --- metrics and federated evaluation -----------------------------------------------

    def report_metrics(self, records: Sequence[MetricRecord]) -> int:
        """Send de-identified numbers (the hub refuses anything but short keys and floats)."""
        request = pb.ReportMetricsRequest(records=[metric_record_to_proto(r) for r in records])
        response = self._call(
            "report metrics",
            lambda: self.stub.ReportMetrics(
                request, metadata=self._metadata(), timeout=self.timeout_s
            ),
        )
        return int(response.accepted)

    def fetch_evaluation_tasks(self) -> list[EvaluationTaskView]:
        from datetime import datetime

        response = self._call(
            "fetch evaluation tasks",
            lambda: self.stub.FetchEvaluationTasks(
                pb.FetchEvaluationTasksRequest(), metadata=self._metadata(), timeout=self.timeout_s
            ),
        )
        return [
            EvaluationTaskView(
                t.task_id,
                t.candidate_generation,
                t.reference_generation,
                datetime.fromisoformat(t.deadline),
            )
            for t in response.tasks
        ]

    def submit_evaluation_result(
        self, task_id: str, candidate_score: float, reference_score: float, num_cases: int
    ) -> bool:
        request = pb.SubmitEvaluationResultRequest(
            task_id=task_id,
            candidate_score=candidate_score,
            reference_score=reference_score,
            num_cases=num_cases,
        )
        response = self._call(
            "submit evaluation result",
            lambda: self.stub.SubmitEvaluationResult(
                request, metadata=self._metadata(), timeout=self.timeout_s
            ),
        )
        return bool(response.accepted)


class IntegrityError(FederationError):
    """Downloaded bytes do not match what the hub announced."""


class _Sink:
    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def sha256(self) -> str:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class _MemorySink(_Sink):
    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        self.buffer.extend(data)

    def size(self) -> int:
        return len(self.buffer)

    def sha256(self) -> str:
        return hashlib.sha256(self.buffer).hexdigest()

    def reset(self) -> None:
        self.buffer.clear()


class _FileSink(_Sink):
    """Appends to a ``.part`` file whose size is the resume offset, even after a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("ab")

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self._fh.flush()

    def size(self) -> int:
        return self._fh.tell()

    def sha256(self) -> str:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        digest = hashlib.sha256()
        with self.path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()

    def reset(self) -> None:
        self._fh.truncate(0)
        self._fh.seek(0)

    def close(self) -> None:
        self._fh.close()
