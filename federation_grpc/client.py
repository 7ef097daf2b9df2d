"""Node-side federation client: bytes and metadata in, bytes out.

Everything a node does with the hub goes through ``FederationClient``: enrol, watch for
new generations (reconnecting), download a generation (resuming by offset, sha256
checked), upload an update (resuming from the offset the hub reports, idempotent by
update id), report de-identified metrics, and take part in federated evaluation.
Transient failures are retried with exponential backoff and jitter; a refusal (bad
request, bad credentials) is raised at once as a ``FederationError``.

The channel, credentials and retries are in :mod:`federation_grpc.connection`, the
generations' watch and download in :mod:`federation_grpc.downloading`, the resumable
upload in :mod:`federation_grpc.uploading`.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

from federation_grpc._proto import federation_pb2 as pb
from federation_grpc._proto import federation_pb2_grpc
from federation_grpc.connection import (
    CallSettings,
    ClientTls,
    Interceptor,
    RetryPolicy,
    open_channel,
)
from federation_grpc.downloading import (
    Generation,
    download_bytes,
    download_file,
    watch_generations,
)
from federation_grpc.hub.domain import EvaluationTaskView, MetricRecord, UploadStatus
from federation_grpc.hub.serde import metric_record_to_proto, upload_status_from_proto
from federation_grpc.uploading import UpdateMetadata, open_upload, upload_update


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
        chunk_size: int = 256 * 1024,
        timeout_s: float = 120.0,
        server_name: str | None = None,
        interceptors: Sequence[Interceptor] = (),
    ) -> None:
        self.channel = open_channel(target, tls=tls, insecure=insecure,
                                    server_name=server_name, interceptors=interceptors)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)
        self._upload_call = open_upload(self.channel)
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

    def _settings(self) -> CallSettings:
        return CallSettings.for_node(self.node_token, self.timeout_s, self.retry)

    # --- enrolment ----------------------------------------------------------------------

    def enrol(
        self, enrolment_token: str, display_name: str = "", request_id: str = ""
    ) -> tuple[str, str]:
        """Trade a one-time enrolment token for ``(node_id, node_token)``; keeps the token.

        ``request_id`` names this enrolment (a random one when not given): the call
        retried, or made again with the same id after the answer was lost, gets the same
        answer. Keep it until the credentials are saved.
        """
        request = pb.EnrolRequest(
            enrolment_token=enrolment_token,
            display_name=display_name,
            request_id=request_id or uuid.uuid4().hex,
        )
        settings = self._settings()
        response = settings.run(
            "enrol", lambda: self.stub.Enrol(request, timeout=settings.timeout_s)
        )
        self.node_token = response.node_token
        return response.node_id, response.node_token

    # --- generations --------------------------------------------------------------------

    def watch(
        self, known_generation: int = -1, stop: threading.Event | None = None
    ) -> Iterator[Generation]:
        """Yield each new current generation; reconnects (with backoff) until ``stop`` is set."""
        return watch_generations(
            self.stub, self._settings, known_generation, stop or threading.Event()
        )

    def download(self, generation: int, on_chunk: Callable[[int], None] | None = None) -> bytes:
        """The generation's safetensors bytes, resuming by offset across failures."""
        return download_bytes(self.stub, self._settings(), generation, self.chunk_size, on_chunk)

    def download_to(
        self, generation: int, path: Path, on_chunk: Callable[[int], None] | None = None
    ) -> Path:
        """Download into ``path``; a ``path.part`` left by an interrupted run is resumed."""
        return download_file(
            self.stub, self._settings(), generation, self.chunk_size, path, on_chunk
        )

    # --- updates ------------------------------------------------------------------------

    def upload_status(self, update_id: str) -> UploadStatus:
        request = pb.GetUploadStatusRequest(update_id=update_id)
        settings = self._settings()
        response = settings.run(
            "upload status",
            lambda: self.stub.GetUploadStatus(
                request, metadata=settings.metadata, timeout=settings.timeout_s
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

        The first attempt starts at byte 0; the hub answers an update it already holds
        (partly: a node that crashed mid-upload) with its status instead of taking the
        bytes again. An attempt after an interrupted one asks the hub how many bytes it
        holds for ``meta.update_id`` and sends only the rest.
        """
        return upload_update(self._upload_call, self.upload_status, self._settings(),
                             self.chunk_size, payload, meta, on_chunk)

    # --- metrics and federated evaluation -----------------------------------------------

    def report_metrics(self, records: Sequence[MetricRecord]) -> int:
        """Send de-identified numbers (the hub refuses anything but short keys and floats)."""
        request = pb.ReportMetricsRequest(records=[metric_record_to_proto(r) for r in records])
        settings = self._settings()
        response = settings.run(
            "report metrics",
            lambda: self.stub.ReportMetrics(
                request, metadata=settings.metadata, timeout=settings.timeout_s
            ),
        )
        return int(response.accepted)

    def fetch_evaluation_tasks(self) -> list[EvaluationTaskView]:
        settings = self._settings()
        response = settings.run(
            "fetch evaluation tasks",
            lambda: self.stub.FetchEvaluationTasks(
                pb.FetchEvaluationTasksRequest(),
                metadata=settings.metadata,
                timeout=settings.timeout_s,
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
        settings = self._settings()
        response = settings.run(
            "submit evaluation result",
            lambda: self.stub.SubmitEvaluationResult(
                request, metadata=settings.metadata, timeout=settings.timeout_s
            ),
        )
        return bool(response.accepted)
