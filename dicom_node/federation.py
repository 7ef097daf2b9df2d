"""Glue between the node and the hub: model <-> safetensors bytes <-> federation_grpc.

    enrol once (token -> node id + node token, kept 0600 in data_dir)
    watch thread:   hub generation g --download (resumable, sha256)--> serve (hot swap)
    upload thread:  update_outbox rows --upload (resumable, idempotent by id)--> hub
                    quality metrics + correction Dice (numbers only) --> hub
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

import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import select

from dicom_node.config import FederationSettings, NodeConfig
from dicom_node.pipeline.federated_evaluation import EvaluationResponder
from dicom_node.pipeline.hub_generations import known_hub_generation, serve_hub_generation
from dicom_node.pipeline.model_sources import ModelRegistry
from dicom_node.pipeline.site_adaptation import (
    SITE_CHECK,
    SITE_CHECK_KIND,
    SiteCheck,
    check_pending,
)
from dicom_node.pipeline.versions import (
    LOCAL_FLOOR,
    ensure_base_version,
    hub_base_generation,
    serving_version,
)
from dicom_node.store.db import Database
from dicom_node.store.jobs import JobQueue
from dicom_node.store.models import (
    AuditEvent,
    Correction,
    ModelVersion,
    OutboxState,
    Segmentation,
    UpdateOutboxItem,
)
from dicom_node.store.private import private_dir
from federation_grpc.client import FederationClient
from federation_grpc.connection import ClientTls, RetryPolicy
from federation_grpc.downloading import Generation
from federation_grpc.errors import (
    FederationError,
    InvalidRequest,
    PermissionDenied,
    Unauthenticated,
)
from federation_grpc.hub.domain import MetricRecord, UploadState
from federation_grpc.uploading import UpdateMetadata

LOGGER = logging.getLogger(__name__)

# Update ids on the hub are UUIDs; the node's are deterministic UIDs of the round.
_UPDATE_NAMESPACE = uuid.UUID("5b0c8f1e-7a43-4c7e-9d1e-2f6a9c1b7d30")
_METRIC_BATCH = 200
_MAX_VALUES = 256  # the hub refuses records with more values
_METRICS_WAIT_S = 600.0
_METRIC_KEY_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")
REFUSED_EVENT = "hub-refused"
ENROLLED_EVENT = "hub-enrolled"
_CREDENTIAL_ERRORS = (PermissionDenied, Unauthenticated)

Interceptor = Any  # a grpc.*ClientInterceptor


def hub_update_id(node_id: str, update_id: str) -> str:
    """The hub-side id of a node update: a UUID derived from the node and the round.

    A round's own id is deterministic within one node (same base, same samples), so
    two sites can hold the same one; the node id keeps them apart at the hub, and a
    retry of one node's round keeps its id (idempotent upload)."""
    return str(uuid.uuid5(_UPDATE_NAMESPACE, f"{node_id}/{update_id}"))


# -- credentials ----------------------------------------------------------------------
class Credentials:
    """The node id and token the hub gave at enrolment, in a file only the owner reads."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[str, str] | None:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        return str(doc["node_id"]), str(doc["node_token"])

    def save(self, node_id: str, node_token: str, hub: str) -> None:
        private_dir(self.path.parent)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"node_id": node_id, "node_token": node_token, "hub": hub,
                       "enrolled_at": datetime.now(UTC).isoformat()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)


def make_client(settings: FederationSettings, node_token: str = "",
                interceptors: Sequence[Interceptor] = ()) -> FederationClient:
    tls = None
    if not settings.insecure_loopback:
        assert settings.ca_cert and settings.cert and settings.key
        tls = ClientTls.from_files(settings.ca_cert, settings.cert, settings.key)
    client = FederationClient(
        settings.hub, tls=tls, insecure=settings.insecure_loopback, node_token=node_token,
        # Short retries inside a call; the agent's own backoff covers long outages.
        retry=RetryPolicy(attempts=3, initial_backoff_s=0.2, max_backoff_s=2.0),
        chunk_size=settings.chunk_kb * 1024, timeout_s=settings.rpc_timeout_s,
        server_name=settings.server_name or None, interceptors=interceptors)
    return client


# -- the agent ------------------------------------------------------------------------
class FederationAgent:
    """Runs the node's side of federation in two daemon threads (watch, upload)."""

    def __init__(self, config: NodeConfig, db: Database, models: ModelRegistry) -> None:
        self.config = config
        self.settings = config.federation
        self.db = db
        self.models = models
        self.queue = JobQueue(db, lease_s=config.jobs.lease_s)  # generation-adapt jobs
        self.dir = config.node.data_dir / "federation"
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
        self._next_try: dict[int, float] = {}
        self.generation_applied = threading.Event()
        self.evaluations = EvaluationResponder(db, models, config.node.data_dir,
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
                    node_id, token = client.enrol(self.settings.enrolment_token,
                                                  self.settings.display_name)
                except BaseException:
                    client.close()
                    raise
                self.credentials.save(node_id, token, self.settings.hub)
                LOGGER.info("enrolled with hub %s as node %s", self.settings.hub, node_id)
                self._audit(ENROLLED_EVENT, f"enrolled as {node_id}")
                client.close()
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
                    ensure_base_version(s, self.config, serving_config)
        serve_hub_generation(self.db, self.models, name, target.read_bytes(),
                             generation=generation.number, parent=generation.parent,
                             config_json=generation.config_json,
                             models_dir=self.config.node.data_dir / "models",
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
        with self.db.session() as s:
            rows = [(r.id, r.update_id, r.model_name, r.base_generation, r.path, dict(r.meta),
                     r.attempts)
                    for r in s.execute(select(UpdateOutboxItem).where(
                        UpdateOutboxItem.state == OutboxState.PENDING)
                        .order_by(UpdateOutboxItem.id)).scalars()]
        sent = 0
        for row_id, update_id, model, base, path, meta, attempts in rows:
            if self._stop.is_set() or time.monotonic() < self._next_try.get(row_id, 0.0):
                continue
            try:
                payload = Path(path).read_bytes()
                with self.db.session() as s:
                    hub_base = hub_base_generation(s, model, base)
                client = self.client()
                assert self.node_id is not None
                status = client.upload(payload, _update_metadata(
                    hub_update_id(self.node_id, update_id), hub_base, meta))
            except InvalidRequest as exc:
                self._finish(row_id, OutboxState.DEAD, f"hub refused the update: {exc}")
                continue
            except _CREDENTIAL_ERRORS as exc:
                if self.refused_by_hub(exc):
                    self._retry_later(row_id, attempts, f"hub refuses this node: {exc}")
                    return sent
                self._finish(row_id, OutboxState.DEAD, f"hub refused the update: {exc}")
                continue
            except (FederationError, OSError, grpc.RpcError) as exc:
                self._retry_later(row_id, attempts, f"{type(exc).__name__}: {exc}")
                if isinstance(exc, OSError):
                    continue
                break  # the hub is unreachable: the next rows would fail the same way
            note = None
            if status.state == UploadState.REJECTED:
                note = f"delivered; rejected by the hub: {status.reason}"
            elif status.state not in (UploadState.RECEIVED, UploadState.MERGED):
                self._retry_later(row_id, attempts, f"hub holds it as {status.state}")
                continue
            self._finish(row_id, OutboxState.SENT, note)
            sent += 1
            LOGGER.info("update %s delivered to the hub (%s)", update_id, status.state)
        return sent

    def _retry_later(self, row_id: int, attempts: int, error: str) -> None:
        delay = min(self.settings.upload_backoff_max_s,
                    self.settings.upload_interval_s * 2 ** min(attempts, 12))
        self._next_try[row_id] = time.monotonic() + delay
        with self.db.session() as s:
            row = s.get(UpdateOutboxItem, row_id)
            if row is not None:
                row.attempts += 1
                row.last_error = error[:2000]
        LOGGER.warning("update outbox row %d not delivered (attempt %d), retry in %.0f s: %s",
                       row_id, attempts + 1, delay, error)

    def _finish(self, row_id: int, state: OutboxState, note: str | None) -> None:
        self._next_try.pop(row_id, None)
        with self.db.session() as s:
            row = s.get(UpdateOutboxItem, row_id)
            if row is not None:
                row.state = state
                row.attempts += 1
                row.last_error = note
                if state == OutboxState.SENT:
                    row.sent_at = datetime.now(UTC)

    def report_metrics(self) -> int:
        """Send quality metrics and correction Dice recorded since the last report."""
        cursor_path = self.dir / "metrics-cursor.json"
        try:
            cursor = json.loads(cursor_path.read_text())
        except (FileNotFoundError, ValueError):
            cursor = {"segmentation": 0, "correction": 0}
        records, seg_last, corr_last = self._metric_records(cursor)
        checks, check_last = self._site_check_records(int(cursor.get("site_check", 0)))
        records += checks
        if not records:
            return 0
        client = self.client()
        accepted = 0
        for start in range(0, len(records), _METRIC_BATCH):
            accepted += client.report_metrics(records[start:start + _METRIC_BATCH])
        private_dir(self.dir)
        cursor_path.write_text(json.dumps({"segmentation": seg_last, "correction": corr_last,
                                           "site_check": check_last}))
        LOGGER.info("reported %d metric records to the hub", accepted)
        return accepted

    def _site_check_records(self, last: int) -> tuple[list[MetricRecord], int]:
        """One ``site-check`` record per hub generation this node checked (held-out
        Dice before, as received and fine-tuned; whether it rolled the generation back;
        see ``pipeline.site_adaptation``), keyed by the hub's generation number."""
        records: list[MetricRecord] = []
        with self.db.session() as s:
            for row in s.execute(select(ModelVersion).where(
                    ModelVersion.id > last, ModelVersion.origin == "hub",
                    ModelVersion.name == self.settings.model)
                    .order_by(ModelVersion.id)).scalars():
                check = (row.metrics or {}).get(SITE_CHECK)
                if check is None and check_pending(s, row.name, row.generation):
                    break  # its check is still to come
                last = row.id
                try:
                    values = SiteCheck(**check).values() if check is not None else None
                except TypeError:  # a check stored by another version of the node
                    values = None
                if values is not None:
                    records.append(MetricRecord(SITE_CHECK_KIND, row.generation, values))
        return records, last

    def _metric_records(self, cursor: dict[str, int]) -> tuple[list[MetricRecord], int, int]:
        """Segmentation records (metrics) and correction records (the metrics of the
        segmentation corrected plus its Dice), both carrying ``segmentation_seq``, the
        local row id, so that the hub can pair them; no UID leaves. A segmentation whose
        metrics are still being computed holds the cursor back (for a while)."""
        name = self.settings.model
        records: list[MetricRecord] = []
        seg_last, corr_last = int(cursor["segmentation"]), int(cursor["correction"])
        with self.db.session() as s:
            for seg in s.execute(select(Segmentation).where(
                    Segmentation.id > seg_last, Segmentation.model_name == name)
                    .order_by(Segmentation.id)).scalars():
                if _metrics_pending(seg):
                    break
                seg_last = seg.id
                values = _segmentation_values(seg)
                base = hub_base_generation(s, name, seg.generation)
                values["local_version"] = 1.0 if seg.generation >= LOCAL_FLOOR else 0.0
                records.append(MetricRecord("segmentation", base, values))
            for corr in s.execute(select(Correction).where(
                    Correction.id > corr_last).order_by(Correction.id)).scalars():
                if corr.model_name != name or corr.ai_generation is None:
                    corr_last = corr.id
                    continue
                dice = {f"dice.{k}": v for k, v in _numbers(corr.dice).items()}
                if not dice:
                    corr_last = corr.id
                    continue
                linked = (s.get(Segmentation, corr.segmentation_id)
                          if corr.segmentation_id is not None else None)
                if linked is not None and _metrics_pending(linked):
                    break
                corr_last = corr.id
                values = _segmentation_values(linked) if linked is not None else {}
                # Dice first: it is what makes the record worth having if space runs out.
                values = dict(list(dice.items())
                              + list(values.items())[:_MAX_VALUES - len(dice) - 1])
                values["local_version"] = 1.0 if corr.ai_generation >= LOCAL_FLOOR else 0.0
                records.append(MetricRecord(
                    "correction", hub_base_generation(s, name, corr.ai_generation), values))
        return records, seg_last, corr_last


def _metrics_pending(seg: Segmentation) -> bool:
    """Metrics are computed after the SEG is delivered: wait for them, but not forever
    (a failure there must not stop reporting)."""
    if set(seg.metrics or {}) - {"domain"}:  # the quality metrics are in (the domain
        return False                           # verdict is stored before the SEG goes out)
    created = seg.created_at if seg.created_at.tzinfo else seg.created_at.replace(tzinfo=UTC)
    return (datetime.now(UTC) - created).total_seconds() < _METRICS_WAIT_S


def _segmentation_values(seg: Segmentation) -> dict[str, float]:
    values = {"segmentation_seq": float(seg.id)}
    values.update(list(_numbers(seg.metrics).items())[:_MAX_VALUES - 8])
    return values


def _numbers(values: Any) -> dict[str, float]:
    """Finite numbers under short identifier keys; anything else is left behind."""
    out: dict[str, float] = {}
    if not isinstance(values, dict):
        return out
    for key, value in values.items():
        if (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value) and 0 < len(key) <= 64
                and set(key) <= _METRIC_KEY_CHARS):
            out[key] = float(value)
    return out


def _update_metadata(hub_id: str, hub_base: int, meta: dict[str, Any]) -> UpdateMetadata:
    groups = json.loads(meta.get("trained_groups", "[]"))
    validation = json.loads(meta.get("validation", "null")) or {}
    local: dict[str, float] = {}
    for which in ("base", "candidate"):
        figures = validation.get(which) or {}
        if isinstance(figures.get("mean"), int | float):
            local[f"held_out.{which}.mean"] = float(figures["mean"])
    if isinstance(validation.get("cases"), int):
        local["held_out.cases"] = float(validation["cases"])
    if str(meta.get("num_slices", "")).isdigit():
        local["num_slices"] = float(meta["num_slices"])
    return UpdateMetadata(
        update_id=hub_id, base_generation=hub_base,
        num_samples=int(meta.get("num_samples", "1")), trained_groups=tuple(groups),
        local_metrics={k: v for k, v in local.items() if math.isfinite(v)})
