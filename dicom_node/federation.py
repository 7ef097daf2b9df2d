"""The federation agent: the node's side of federation, glue between the node and the hub
(model <-> safetensors bytes <-> federation_grpc).

    enrol once (token -> node id + node token, kept 0600 in data_dir: hub_enrolment)
    watch thread:   hub generation g --download (resumable, sha256)--> serve (hot swap)
    upload thread:  update_outbox rows --upload (resumable, idempotent by id)--> hub
                    quality records: metrics + correction Dice (numbers only) --> hub
                    evaluation tasks: candidate vs reference Dice on held-out
                    corrected cases (two numbers and a count) --> hub

What crosses to the hub is limited to: the enrolment token and display name, update
weights (safetensors of trained parameter groups) with sample counts and held-out
Dice, and metric records of floats keyed by label/metric names with a generation
number. No UIDs, names or pixels (invariant 3; tests/federation_node checks the wire).

Offline is normal: a row the hub did not take stays ``pending`` with its last error
and is retried with backoff for as long as it takes. Only a refusal of the update
itself (``INVALID_ARGUMENT``) dead-letters it.

A refusal of the node itself (``UNAUTHENTICATED``: unknown token; ``PERMISSION_DENIED``:
revoked node, spent or expired enrolment token) is not retried: it is logged as an
error, recorded as a ``hub-refused`` audit event that ``tessera node status`` shows,
and federation stops until the node is enrolled again and restarted; the outbox keeps
its updates. A ``PERMISSION_DENIED`` of one request (a generation no longer offered)
is told apart by a probe that needs nothing but valid credentials.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc

from dicom_node.config import FederationSettings
from dicom_node.hub_enrolment import Credentials, Interceptor, make_client
from dicom_node.pipeline.federated_evaluation import EvaluationResponder
from dicom_node.pipeline.hub_generations import known_hub_generation, serve_hub_generation
from dicom_node.pipeline.model_sources import ModelRegistry
from dicom_node.pipeline.versions import (
    ensure_base_version,
    hub_base_generation,
    serving_version,
)
from dicom_node.quality_records import (
    load_cursor,
    metric_records,
    save_cursor,
    site_check_records,
)
from dicom_node.store.db import Database
from dicom_node.store.jobs import JobQueue
from dicom_node.store.models import AuditEvent, OutboxState
from dicom_node.store.private import private_dir
from dicom_node.update_outbox import UpdateOutbox, update_metadata
from federation_grpc.client import FederationClient
from federation_grpc.downloading import Generation
from federation_grpc.errors import (
    FederationError,
    InvalidRequest,
    PermissionDenied,
    Unauthenticated,
)
from federation_grpc.hub.domain import MetricRecord, UploadState

LOGGER = logging.getLogger(__name__)

# Update ids on the hub are UUIDs; the node's are deterministic UIDs of the round.
_UPDATE_NAMESPACE = uuid.UUID("5b0c8f1e-7a43-4c7e-9d1e-2f6a9c1b7d30")
_METRIC_BATCH = 200
REFUSED_EVENT = "hub-refused"
ENROLLED_EVENT = "hub-enrolled"
_CREDENTIAL_ERRORS = (PermissionDenied, Unauthenticated)


def hub_update_id(node_id: str, update_id: str) -> str:
    """The hub-side id of a node update: a UUID derived from the node and the round.

    A round's own id is deterministic within one node (same base, same samples), so
    two sites can hold the same one; the node id keeps them apart at the hub, and a
    retry of one node's round keeps its id (idempotent upload)."""
    return str(uuid.uuid5(_UPDATE_NAMESPACE, f"{node_id}/{update_id}"))


# -- the agent ------------------------------------------------------------------------
class FederationAgent:
    """Runs the node's side of federation in two daemon threads (watch, upload)."""

    def __init__(self, settings: FederationSettings, db: Database, models: ModelRegistry,
                 queue: JobQueue, data_dir: Path) -> None:
        """``queue`` takes the generation-adapt jobs; ``data_dir`` holds the credentials,
        downloads and served generations."""
        self.settings = settings
        self.db = db
        self.models = models
        self.queue = queue
        self.data_dir = data_dir
        self.dir = data_dir / "federation"
        self.credentials = Credentials(self.settings.credentials_path
                                       or self.dir / "credentials.json")
        self.interceptors: list[Interceptor] = []  # tests record the wire here
        # Called with the bytes of a generation on disk after each chunk (tests crash here).
        self.download_hooks: list[Callable[[int], None]] = []
        self.node_id: str | None = None
        self._client: FederationClient | None = None
        self._client_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.outbox = UpdateOutbox(db, self.settings)
        self.generation_applied = threading.Event()
        self.evaluations = EvaluationResponder(db, models, data_dir,
                                               self.settings.model)
        self.refused: str | None = None  # why the hub refuses this node, once it does

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> FederationAgent:
        self._stop.clear()
        self.refused = None
        targets: list[tuple[str, Callable[[], None]]] = [("federation-upload", self._upload_loop)]
        if self.settings.watch:
            targets.append(("federation-watch", self._watch_loop))
        for name, target in targets:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        with self._client_lock:
            if self._client is not None:
                self._client.close()  # cancels a watch stream in flight
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        with self._client_lock:
            self._client = None

    @property
    def running(self) -> bool:
        """Whether a federation thread still runs (none does after the hub refused the node)."""
        return any(t.is_alive() for t in self._threads)

    def wake(self) -> None:
        """Try pending uploads now (e.g. after a training round committed one)."""
        self._wake.set()

    # -- connection ---------------------------------------------------------------------
    def client(self) -> FederationClient:
        """The enrolled client; enrols on first use. Raises FederationError if it cannot."""
        with self._client_lock:
            if self._client is not None:
                return self._client
            stored = self.credentials.load()
            if stored is None:
                if not self.settings.enrolment_token:
                    raise FederationError("not enrolled: set [federation] enrolment_token "
                                          f"(tessera hub enrol) or provide {self.credentials.path}")
                client = make_client(self.settings, interceptors=self.interceptors)
                try:
                    node_id, token = client.enrol(
                        self.settings.enrolment_token, self.settings.display_name,
                        self.credentials.enrolment_request(self.settings.enrolment_token))
                except BaseException:
                    client.close()
                    raise
                client.close()
                # The event before the file: a crash between them leaves no credentials,
                # and the next start enrols again under the same request id (the same
                # node), where the other order could leave an old refusal shown as current.
                self._audit(ENROLLED_EVENT, f"enrolled as {node_id}")
                self.credentials.save(node_id, token, self.settings.hub)
                LOGGER.info("enrolled with hub %s as node %s", self.settings.hub, node_id)
                stored = (node_id, token)
            self.node_id = stored[0]
            self._client = make_client(self.settings, stored[1], self.interceptors)
            return self._client

    # -- refusals --------------------------------------------------------------------------
    def refused_by_hub(self, exc: BaseException) -> bool:
        """Whether ``exc`` refuses this node itself rather than one request; if it does,
        log it, record it for ``tessera node status`` and stop federating (no retries)."""
        if self.refused is not None:
            return True
        if not isinstance(exc, _CREDENTIAL_ERRORS):
            return False
        if isinstance(exc, PermissionDenied) and not self._credentials_refused():
            return False
        self.refused = f"{type(exc).__name__}: {exc}"
        LOGGER.error(
            "hub %s refuses this node (%s); federation stops (updates stay in the outbox) "
            "until the node is enrolled again: set a new [federation] enrolment_token, "
            "remove %s and restart", self.settings.hub, self.refused, self.credentials.path)
        try:
            self._audit(REFUSED_EVENT, self.refused)
        except Exception:  # the refusal is logged; the database may be what is failing
            LOGGER.exception("could not record the hub's refusal")
        self._stop.set()
        self._wake.set()
        return True

    def _credentials_refused(self) -> bool:
        """Probe with a call that needs nothing but valid credentials (the status of an
        update id nobody used)."""
        try:
            self.client().upload_status(str(uuid.uuid4()))
        except _CREDENTIAL_ERRORS:
            return True
        except (FederationError, OSError, grpc.RpcError):
            return False  # unreachable or unclear: treat as transient
        return False

    def _audit(self, kind: str, reason: str) -> None:
        with self.db.session() as s:
            s.add(AuditEvent(kind=kind, peer_address=self.settings.hub[:64], reason=reason))

    def _pause(self, failures: int) -> None:
        self._stop.wait(min(self.settings.upload_backoff_max_s, 0.5 * 2 ** min(failures, 12)))

    # -- generations --------------------------------------------------------------------
    def _watch_loop(self) -> None:
        failures = 0
        name = self.settings.model
        while not self._stop.is_set():
            try:
                known = known_hub_generation(self.db, name)
                for generation in self.client().watch(known, self._stop):
                    if generation.superseded:
                        LOGGER.info("hub generations %s were published and replaced by %d "
                                    "meanwhile: only %d is fetched",
                                    list(generation.superseded)[:20], generation.number,
                                    generation.number)
                    self.apply(generation)
                    failures = 0
            except Exception as exc:  # the hub, the disk or a bad generation: retry later
                if self._stop.is_set() or self.refused_by_hub(exc):
                    return
                failures += 1
                LOGGER.warning("following hub generations failed (%s: %s); retrying",
                               type(exc).__name__, exc)
                self._pause(failures)

    def apply(self, generation: Generation) -> None:
        """Download ``generation`` (resuming a ``.part`` left by a crash) and serve it."""
        name = self.settings.model
        downloads = self.dir / "downloads"
        private_dir(downloads)
        target = downloads / f"{name}-generation-{generation.number:05d}.safetensors"
        part = target.with_name(target.name + ".part")
        if part.exists() and part.stat().st_size:
            LOGGER.info("resuming download of generation %d at byte %d", generation.number,
                        part.stat().st_size)
        self.client().download_to(generation.number, target, on_chunk=self._downloaded
                                  if self.download_hooks else None)
        if self.settings.adapt:  # the version served until now is a rollback target
            _, serving_config = self.models.get(name)
            with self.db.session() as s:
                if (serving_version(s, name) is None
                        and serving_config.generation != generation.number):
                    ensure_base_version(s, self.models, serving_config)
        serve_hub_generation(self.db, self.models, name, target.read_bytes(),
                             generation=generation.number, parent=generation.parent,
                             config_json=generation.config_json,
                             models_dir=self.data_dir / "models",
                             adapt_queue=self.queue if self.settings.adapt else None)
        target.unlink(missing_ok=True)
        self.generation_applied.set()

    def _downloaded(self, received: int) -> None:
        for hook in self.download_hooks:
            hook(received)

    # -- updates and metrics ------------------------------------------------------------
    def _upload_loop(self) -> None:
        failures = 0
        next_metrics = next_evaluation = 0.0
        while not self._stop.is_set():
            try:
                self.upload_pending()
                if self._stop.is_set():
                    return
                if time.monotonic() >= next_metrics:
                    self.report_metrics()
                    next_metrics = time.monotonic() + self.settings.metrics_interval_s
                if self.settings.evaluate and time.monotonic() >= next_evaluation:
                    self.evaluations.answer(self.client(), self.refused_by_hub)
                    next_evaluation = time.monotonic() + self.settings.evaluation_interval_s
                failures = 0
            except Exception as exc:
                if self.refused_by_hub(exc):
                    return
                failures += 1
                LOGGER.warning("federation upload/metrics round failed (%s: %s)",
                               type(exc).__name__, exc)
            self._wake.wait(self.settings.upload_interval_s if not failures else
                            min(self.settings.upload_backoff_max_s, 0.5 * 2 ** min(failures, 12)))
            self._wake.clear()

    def upload_pending(self) -> int:
        """Send every pending update whose backoff has passed; returns how many went."""
        sent = 0
        for row in self.outbox.pending():
            if self._stop.is_set() or self.outbox.backing_off(row.row_id):
                continue
            try:
                payload = Path(row.path).read_bytes()
                with self.db.session() as s:
                    hub_base = hub_base_generation(s, row.model, row.base_generation)
                client = self.client()
                assert self.node_id is not None
                status = client.upload(payload, update_metadata(
                    hub_update_id(self.node_id, row.update_id), hub_base, row.meta))
            except InvalidRequest as exc:
                self.outbox.finish(row.row_id, OutboxState.DEAD, f"hub refused the update: {exc}")
                continue
            except _CREDENTIAL_ERRORS as exc:
                if self.refused_by_hub(exc):
                    self.outbox.retry_later(row.row_id, row.attempts,
                                            f"hub refuses this node: {exc}")
                    return sent
                self.outbox.finish(row.row_id, OutboxState.DEAD, f"hub refused the update: {exc}")
                continue
            except (FederationError, OSError, grpc.RpcError) as exc:
                self.outbox.retry_later(row.row_id, row.attempts, f"{type(exc).__name__}: {exc}")
                if isinstance(exc, OSError):
                    continue
                break  # the hub is unreachable: the next rows would fail the same way
            note = None
            if status.state == UploadState.REJECTED:
                note = f"delivered; rejected by the hub: {status.reason}"
            elif status.state not in (UploadState.RECEIVED, UploadState.MERGED):
                self.outbox.retry_later(row.row_id, row.attempts, f"hub holds it as {status.state}")
                continue
            self.outbox.finish(row.row_id, OutboxState.SENT, note)
            sent += 1
            LOGGER.info("update %s delivered to the hub (%s)", row.update_id, status.state)
        return sent

    def report_metrics(self) -> int:
        """Send quality metrics and correction Dice recorded since the last report."""
        cursor_path = self.dir / "metrics-cursor.json"
        cursor = load_cursor(cursor_path)
        records, seg_last, corr_last = self._metric_records(cursor)
        with self.db.session() as s:
            checks, check_last = site_check_records(s, self.settings.model,
                                                    int(cursor.get("site_check", 0)))
        records += checks
        if not records:
            return 0
        client = self.client()
        accepted = 0
        for start in range(0, len(records), _METRIC_BATCH):
            accepted += client.report_metrics(records[start:start + _METRIC_BATCH])
        save_cursor(cursor_path, {"segmentation": seg_last, "correction": corr_last,
                                  "site_check": check_last})
        LOGGER.info("reported %d metric records to the hub", accepted)
        return accepted

    def _metric_records(self, cursor: dict[str, int]) -> tuple[list[MetricRecord], int, int]:
        with self.db.session() as s:
            return metric_records(s, self.settings.model, cursor)

