"""Thin gRPC servicers: convert, call the service, map domain errors to status codes."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from federation_grpc import wire
from federation_grpc._proto import admin_pb2 as apb
from federation_grpc._proto import admin_pb2_grpc, federation_pb2_grpc
from federation_grpc._proto import federation_pb2 as pb
from federation_grpc.errors import (
    FailedPrecondition,
    FederationError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from federation_grpc.hub import serde
from federation_grpc.hub.admission import peer_certificate_sha256
from federation_grpc.hub.blobs import StagingBusy
from federation_grpc.hub.domain import UploadStatus
from federation_grpc.hub.service import HubService

LOGGER = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_CODES: list[tuple[type[FederationError], grpc.StatusCode]] = [
    (StagingBusy, grpc.StatusCode.ABORTED),  # another stream writes the update: retry
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
]
MIN_CHUNK = 64 * 1024
MAX_CHUNK = 4 * 1024 * 1024


def status_code_for(error: FederationError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, FederationError):
        code = status_code_for(exc)
        LOGGER.info("%s refused: %s %s", method, code.name, exc)
        context.abort(code, str(exc))
    LOGGER.exception("%s failed", method)
    context.abort(grpc.StatusCode.INTERNAL, "internal hub error; see the hub log")


def unary(method: F) -> F:
    """Map domain errors of a unary-response RPC to status codes."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            _abort(context, exc, method.__name__)

    return wrapper  # type: ignore[return-value]


def streaming(method: F) -> F:
    """Map domain errors of a server-streaming RPC to status codes."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            _abort(context, exc, method.__name__)

    return wrapper  # type: ignore[return-value]


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises a bare Exception after setting the status; let it through.
    return type(exc) is Exception


def bearer_token(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return ""


class FederationServicer(federation_pb2_grpc.FederationServicer):
    def __init__(
        self,
        service: HubService,
        *,
        watch_poll_s: float = 2.0,
        keepalive_s: float = 15.0,
        stopping: threading.Event | None = None,
    ) -> None:
        self.service = service
        self.watch_poll_s = watch_poll_s
        self.keepalive_s = keepalive_s
        self.stopping = stopping or threading.Event()

    def _node(self, context: grpc.ServicerContext) -> str:
        return self.service.authenticate(bearer_token(context), peer_certificate_sha256(context))

    @unary
    def Enrol(self, request: pb.EnrolRequest, context: grpc.ServicerContext) -> pb.EnrolResponse:
        enrolment = self.service.enrol(
            request.enrolment_token,
            request.display_name,
            peer_certificate_sha256(context),
            request.request_id,
        )
        return pb.EnrolResponse(node_id=enrolment.node_id, node_token=enrolment.node_token)

    @streaming
    def WatchGenerations(
        self, request: pb.WatchGenerationsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerationEvent]:
        node = self._node(context)
        LOGGER.info("node %s watches generations (knows %d)", node, request.known_generation)
        last_sent = request.known_generation
        version = -1
        last_event = time.monotonic()
        while context.is_active() and not self.stopping.is_set():
            state = self.service.watch_state(version, self.watch_poll_s)
            version, current = state.version, state.current
            if current is not None and current.number != last_sent:
                yield pb.GenerationEvent(generation=serde.generation_to_proto(current),
                                         superseded=state.superseded(last_sent))
                last_sent, last_event = current.number, time.monotonic()
            elif time.monotonic() - last_event >= self.keepalive_s:
                yield pb.GenerationEvent(keepalive=True)
                last_event = time.monotonic()

    @streaming
    def DownloadGeneration(
        self, request: pb.DownloadGenerationRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadChunk]:
        node = self._node(context)
        path, view = self.service.download_source(request.generation, node)
        if not 0 <= request.offset <= view.size_bytes:
            raise InvalidRequest(f"offset {request.offset} outside 0..{view.size_bytes}")
        default = self.service.config.limits.download_chunk_bytes
        size = min(MAX_CHUNK, max(MIN_CHUNK, request.chunk_size or default))
        offset = request.offset
        with path.open("rb") as fh:
            fh.seek(offset)
            while context.is_active():
                data = fh.read(size)
                if not data:
                    break
                yield pb.DownloadChunk(
                    offset=offset, data=data, total_size=view.size_bytes, sha256=view.sha256
                )
                offset += len(data)
        if offset == view.size_bytes == request.offset:  # nothing left: say where the end is
            yield pb.DownloadChunk(offset=offset, total_size=view.size_bytes, sha256=view.sha256)

    @unary
    def UploadUpdate(
        self, request_iterator: Iterator[wire.UploadPart], context: grpc.ServicerContext
    ) -> pb.UploadUpdateResponse:
        """Messages arrive through :func:`federation_grpc.wire.parse_upload_request`:
        chunks as views of the received bytes, the header as a parsed message."""
        node = self._node(context)
        first = next(request_iterator, None)
        if not isinstance(first, pb.UploadUpdateRequest) or first.WhichOneof("part") != "header":
            raise InvalidRequest("the first message of an upload must carry the header")
        opened = self.service.uploads.begin(node, serde.header_from_proto(first.header))
        if isinstance(opened, UploadStatus):
            return serde.upload_status_to_proto(opened)
        try:
            for message in request_iterator:
                chunk = wire.chunk_of(message)
                if chunk is None:
                    raise InvalidRequest("only the first message of an upload carries a header")
                opened.write(chunk)
        except BaseException:
            opened.close()
            raise
        return serde.upload_status_to_proto(opened.finish())

    @unary
    def GetUploadStatus(
        self, request: pb.GetUploadStatusRequest, context: grpc.ServicerContext
    ) -> pb.UploadUpdateResponse:
        node = self._node(context)
        return serde.upload_status_to_proto(self.service.uploads.status(node, request.update_id))

    @unary
    def ReportMetrics(
        self, request: pb.ReportMetricsRequest, context: grpc.ServicerContext
    ) -> pb.ReportMetricsResponse:
        node = self._node(context)
        records = [serde.metric_record_from_proto(r) for r in request.records]
        return pb.ReportMetricsResponse(accepted=self.service.report_metrics(node, records))

    @unary
    def FetchEvaluationTasks(
        self, request: pb.FetchEvaluationTasksRequest, context: grpc.ServicerContext
    ) -> pb.FetchEvaluationTasksResponse:
        node = self._node(context)
        tasks = self.service.fetch_evaluation_tasks(node)
        return pb.FetchEvaluationTasksResponse(tasks=[serde.task_to_proto(t) for t in tasks])

    @unary
    def SubmitEvaluationResult(
        self, request: pb.SubmitEvaluationResultRequest, context: grpc.ServicerContext
    ) -> pb.SubmitEvaluationResultResponse:
        node = self._node(context)
        accepted = self.service.submit_evaluation_result(
            node,
            request.task_id,
            request.candidate_score,
            request.reference_score,
            request.num_cases,
        )
        return pb.SubmitEvaluationResultResponse(accepted=accepted)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, service: HubService) -> None:
        self.service = service

    def _admin(self, context: grpc.ServicerContext) -> None:
        self.service.check_admin(bearer_token(context))

    @unary
    def CreateEnrolmentToken(
        self, request: apb.CreateEnrolmentTokenRequest, context: grpc.ServicerContext
    ) -> apb.CreateEnrolmentTokenResponse:
        self._admin(context)
        token, expires = self.service.create_enrolment_token(request.ttl_seconds, request.note)
        return apb.CreateEnrolmentTokenResponse(
            enrolment_token=token, expires_at=expires.isoformat()
        )

    @unary
    def ListNodes(
        self, request: apb.ListNodesRequest, context: grpc.ServicerContext
    ) -> apb.ListNodesResponse:
        self._admin(context)
        return apb.ListNodesResponse(
            nodes=[serde.node_to_proto(n) for n in self.service.list_nodes()]
        )

    @unary
    def RevokeNode(
        self, request: apb.RevokeNodeRequest, context: grpc.ServicerContext
    ) -> apb.RevokeNodeResponse:
        self._admin(context)
        return apb.RevokeNodeResponse(
            node=serde.node_to_proto(self.service.revoke_node(request.node_id))
        )

    @unary
    def ListGenerations(
        self, request: apb.ListGenerationsRequest, context: grpc.ServicerContext
    ) -> apb.ListGenerationsResponse:
        self._admin(context)
        views = self.service.list_generations()
        return apb.ListGenerationsResponse(
            generations=[serde.generation_to_proto(v) for v in views]
        )

    @unary
    def PromoteGeneration(
        self, request: apb.PromoteGenerationRequest, context: grpc.ServicerContext
    ) -> pb.GenerationInfo:
        self._admin(context)
        return serde.generation_to_proto(self.service.promote(request.generation))

    @unary
    def RollbackGeneration(
        self, request: apb.RollbackGenerationRequest, context: grpc.ServicerContext
    ) -> pb.GenerationInfo:
        self._admin(context)
        return serde.generation_to_proto(self.service.rollback(request.to_generation))

    @unary
    def ListRejections(
        self, request: apb.ListRejectionsRequest, context: grpc.ServicerContext
    ) -> apb.ListRejectionsResponse:
        self._admin(context)
        views = self.service.list_rejections(request.limit)
        return apb.ListRejectionsResponse(rejections=[serde.rejection_to_proto(v) for v in views])
