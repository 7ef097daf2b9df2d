"""The hub's decisions: enrolment, authentication, generations, metrics, admin.

Imports no grpc. Upload intake lives in ``uploads``, merging and the gate in ``merging``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from sqlalchemy import func, select

from federation_grpc.errors import (
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from federation_grpc.hub import aggregation as agg
from federation_grpc.hub.blobs import BlobStore, StagingArea
from federation_grpc.hub.config import HubConfig
from federation_grpc.hub.domain import (
    Enrolment,
    EvaluationTaskView,
    GenerationView,
    MetricRecord,
    NodeView,
    RejectionView,
)
from federation_grpc.hub.gate import Evaluator, GatePolicy, UpdateGate, load_evaluator
from federation_grpc.hub.nodes import NodeRegistry
from federation_grpc.hub.private import private_dir, warn_if_shared
from federation_grpc.hub.store import (
    EvaluationResultRow,
    EvaluationTaskRow,
    GenerationRow,
    GenerationStatus,
    HubStateRow,
    HubStore,
    MetricRow,
    RejectionRow,
    UpdateRow,
    as_utc,
    utcnow,
)
from federation_grpc.hub.tensorfile import read_tensors

LOGGER = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_METRIC_RECORDS = 1000
MAX_METRIC_VALUES = 256
_TENSOR_CACHE_SIZE = 4


def check_numbers(values: dict[str, float], what: str) -> dict[str, float]:
    """Keep de-identified numbers only: short identifier keys, finite float values."""
    if len(values) > MAX_METRIC_VALUES:
        raise InvalidRequest(f"{what}: more than {MAX_METRIC_VALUES} values")
    out = {}
    for key, value in values.items():
        if not NAME_PATTERN.match(key):
            raise InvalidRequest(f"{what}: key {key[:80]!r} is not a short identifier")
        if not math.isfinite(value):
            raise InvalidRequest(f"{what}: value of {key!r} is not finite")
        out[key] = float(value)
    return out


def parse_tensors(data: bytes) -> dict[str, np.ndarray]:
    """Parse safetensors bytes (no code runs; no pickle). Raises InvalidRequest."""
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequest(f"not a valid safetensors payload: {exc}") from exc


class HubService:
    """Everything the hub decides, independent of the transport."""

    def __init__(
        self,
        config: HubConfig,
        *,
        evaluator: Evaluator | None = None,
        strategy: agg.Strategy | None = None,
    ) -> None:
        from federation_grpc.hub.merging import Aggregator
        from federation_grpc.hub.uploads import UploadIntake

        self.config = config
        warn_if_shared(private_dir(config.data_dir))
        self.store = HubStore(config.resolved_database_url)
        self.blobs = BlobStore(config.data_dir / "blobs")
        self.staging = StagingArea(config.data_dir / "staging")
        if evaluator is None and config.gate.evaluator:
            evaluator = load_evaluator(config.gate.evaluator)
        self.gate = UpdateGate(
            GatePolicy(
                max_update_norm=config.gate.max_update_norm,
                max_relative_update_norm=config.gate.max_relative_update_norm,
                validation_margin=config.gate.validation_margin,
            ),
            evaluator,
        )
        self.strategy = strategy or agg.make_strategy(
            config.aggregation.strategy, **config.aggregation.strategy_options()
        )
        self._changed = threading.Condition()
        self._cache_lock = threading.Lock()
        self._tensor_cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._configs: dict[int, str] = {}
        self.nodes = NodeRegistry(self.store, config)
        self.uploads = UploadIntake(self)
        self.aggregator = Aggregator(self)

    def close(self) -> None:
        self.aggregator.stop()
        with self._changed:
            self._changed.notify_all()
        self.store.dispose()

    # --- nodes (kept in federation_grpc.hub.nodes) ----------------------------------------

    def create_enrolment_token(self, ttl_s: int = 0, note: str = "") -> tuple[str, datetime]:
        return self.nodes.create_enrolment_token(ttl_s, note)

    def enrol(
        self, enrolment_token: str, display_name: str = "", cert_sha256: str = ""
    ) -> Enrolment:
        return self.nodes.enrol(enrolment_token, display_name, cert_sha256)

    def authenticate(self, node_token: str, cert_sha256: str = "") -> str:
        return self.nodes.authenticate(node_token, cert_sha256)

    def check_admin(self, admin_token: str) -> None:
        self.nodes.check_admin(admin_token)

    def list_nodes(self) -> list[NodeView]:
        return self.nodes.list_nodes()

    def rebind_node(self, node_id: str, cert_sha256: str) -> NodeView:
        return self.nodes.rebind_node(node_id, cert_sha256)

    def revoke_node(self, node_id: str) -> NodeView:
        return self.nodes.revoke_node(node_id)

    # --- generations --------------------------------------------------------------------

    def init_model(self, weights: bytes, config_json: str) -> GenerationView:
        """Store generation 0 (safetensors weights + JSON config). Only once."""
        try:
            config = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"model config is not JSON: {exc}") from exc
        if not isinstance(config, dict) or "architecture" not in config:
            raise InvalidRequest("model config must be a JSON object with an 'architecture'")
        tensors = parse_tensors(weights)
        if not tensors:
            raise InvalidRequest("model weights hold no tensors")
        bad = agg.non_finite_tensors(tensors)
        if bad:
            raise InvalidRequest(f"model weights hold non-finite values in {bad[:5]}")
        sha = self.blobs.put(weights)
        with self.store.session() as session:
            if session.scalar(select(func.count()).select_from(GenerationRow)):
                raise FailedPrecondition("the hub already has generations; use promote/rollback")
            session.add(
                GenerationRow(
                    number=0,
                    parent=None,
                    sha256=sha,
                    size_bytes=len(weights),
                    config_json=config_json,
                    strategy="init",
                    status=GenerationStatus.ACTIVE,
                )
            )
            session.flush()
            self._set_current(session, 0)
        self._notify()
        LOGGER.info("generation 0 stored (%d tensors, %d bytes)", len(tensors), len(weights))
        return self.generation(0)

    def current_number(self) -> int | None:
        with self.store.session() as session:
            state = session.get(HubStateRow, 1)
            return state.current_generation if state else None

    def state_version(self) -> int:
        with self.store.session() as session:
            state = session.get(HubStateRow, 1)
            return state.version if state else 0

    def current_generation(self) -> GenerationView | None:
        number = self.current_number()
        return None if number is None else self.generation(number)

    def require_current(self) -> GenerationView:
        current = self.current_generation()
        if current is None:
            raise FailedPrecondition("the hub has no model yet (tessera hub init-model)")
        return current

    def generation(self, number: int) -> GenerationView:
        return self._generation_views([number])[0]

    def list_generations(self) -> list[GenerationView]:
        with self.store.session() as session:
            numbers = list(
                session.scalars(select(GenerationRow.number).order_by(GenerationRow.number))
            )
        return self._generation_views(numbers)

    def _generation_views(self, numbers: Sequence[int]) -> list[GenerationView]:
        with self.store.session() as session:
            state = session.get(HubStateRow, 1)
            current = state.current_generation if state else None
            views = []
            for number in numbers:
                row = session.get(GenerationRow, number)
                if row is None:
                    raise NotFound(f"no generation {number}")
                lineage = session.execute(
                    select(UpdateRow.update_id, UpdateRow.node_id)
                    .where(
                        (UpdateRow.merged_into == number)
                        | (UpdateRow.candidate_generation == number)
                    )
                    .order_by(UpdateRow.received_at)
                ).all()
                views.append(
                    GenerationView(
                        number=row.number,
                        parent=-1 if row.parent is None else row.parent,
                        sha256=row.sha256,
                        size_bytes=row.size_bytes,
                        config_json=row.config_json,
                        created_at=as_utc(row.created_at),
                        strategy=row.strategy,
                        status=row.status,
                        current=row.number == current,
                        validation_score=row.validation_score,
                        update_ids=tuple(u for u, _ in lineage),
                        node_ids=tuple(sorted({n for _, n in lineage})),
                    )
                )
            return views

    def lineage(self, number: int) -> list[int]:
        """``number`` and its ancestors, newest first."""
        with self.store.session() as session:
            parents = dict(
                session.execute(select(GenerationRow.number, GenerationRow.parent)).all()
            )
        chain = []
        cursor: int | None = number
        while cursor is not None and cursor in parents and cursor not in chain:
            chain.append(cursor)
            cursor = parents[cursor]
        return chain

    def generation_config(self, number: int) -> str:
        """The JSON config of a generation (fixed once the generation is stored)."""
        with self._cache_lock:
            if number in self._configs:
                return self._configs[number]
        with self.store.session() as session:
            config_json = session.scalar(
                select(GenerationRow.config_json).where(GenerationRow.number == number)
            )
        if config_json is None:
            raise NotFound(f"no generation {number}")
        with self._cache_lock:
            self._configs[number] = config_json
        return config_json

    def generation_tensors(self, number: int) -> dict[str, np.ndarray]:
        with self._cache_lock:
            if number in self._tensor_cache:
                self._tensor_cache.move_to_end(number)
                return self._tensor_cache[number]
        view = self.generation(number)
        tensors = read_tensors(self.blobs.path(view.sha256))
        with self._cache_lock:
            self._tensor_cache[number] = tensors
            while len(self._tensor_cache) > _TENSOR_CACHE_SIZE:
                self._tensor_cache.popitem(last=False)
        return tensors

    def download_source(self, number: int, node_id: str | None) -> tuple[Path, GenerationView]:
        """Blob path of a generation a node may download (candidates only while evaluated)."""
        view = self.generation(number)
        if view.status == GenerationStatus.REJECTED:
            raise PermissionDenied(f"generation {number} was rejected")
        if view.status == GenerationStatus.CANDIDATE:
            with self.store.session() as session:
                task = session.scalar(
                    select(EvaluationTaskRow).where(
                        EvaluationTaskRow.candidate_generation == number, EvaluationTaskRow.open
                    )
                )
            if task is None:
                raise PermissionDenied(
                    f"generation {number} is a candidate not open for evaluation"
                )
        return self.blobs.path(view.sha256), view

    def promote(self, number: int) -> GenerationView:
        with self.store.session() as session:
            row = session.get(GenerationRow, number)
            if row is None:
                raise NotFound(f"no generation {number}")
            if row.status == GenerationStatus.REJECTED:
                raise FailedPrecondition(f"generation {number} was rejected by the gate")
            row.status = GenerationStatus.ACTIVE
            self._set_current(session, number)
        self._notify()
        LOGGER.warning("generation %d promoted by the operator", number)
        return self.generation(number)

    def rollback(self, to_generation: int = -1) -> GenerationView:
        with self.store.session() as session:
            state = session.get(HubStateRow, 1)
            if state is None or state.current_generation is None:
                raise FailedPrecondition("the hub has no model yet")
            current = session.get(GenerationRow, state.current_generation)
            assert current is not None
            target = current.parent if to_generation < 0 else to_generation
            if target is None:
                raise FailedPrecondition(f"generation {current.number} has no parent")
            row = session.get(GenerationRow, target)
            if row is None:
                raise NotFound(f"no generation {target}")
            if row.status in (GenerationStatus.REJECTED, GenerationStatus.CANDIDATE):
                raise FailedPrecondition(f"generation {target} is {row.status}")
            if target != current.number:
                current.status = GenerationStatus.ROLLED_BACK
            row.status = GenerationStatus.ACTIVE
            self._set_current(session, target)
        self._notify()
        LOGGER.warning("rolled back to generation %d", target)
        return self.generation(target)

    def _set_current(self, session, number: int) -> None:  # type: ignore[no-untyped-def]
        state = session.get(HubStateRow, 1, with_for_update=True)
        state.current_generation = number
        state.version += 1

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for_change(self, known_version: int, timeout: float) -> int:
        """Wait until the current generation may have changed; return the state version.

        Changes made in this process wake waiters at once; changes made elsewhere (the
        CLI, another hub process) are seen by polling at ``timeout``.
        """
        version = self.state_version()
        if version != known_version:
            return version
        with self._changed:
            self._changed.wait(timeout)
        return self.state_version()

    # --- metrics, rejections, evaluation ------------------------------------------------

    def report_metrics(self, node_id: str, records: Sequence[MetricRecord]) -> int:
        if len(records) > MAX_METRIC_RECORDS:
            raise InvalidRequest(f"more than {MAX_METRIC_RECORDS} metric records in one call")
        rows = []
        for record in records:
            if not NAME_PATTERN.match(record.kind):
                raise InvalidRequest(f"metric kind {record.kind[:80]!r} is not a short identifier")
            values = check_numbers(record.values, f"metric record {record.kind!r}")
            rows.append(
                MetricRow(
                    node_id=node_id, kind=record.kind, generation=record.generation, values=values
                )
            )
        with self.store.session() as session:
            session.add_all(rows)
        return len(rows)

    def metric_records(self, kind: str | None = None) -> list[tuple[str, MetricRecord]]:
        with self.store.session() as session:
            query = select(MetricRow).order_by(MetricRow.id)
            if kind:
                query = query.where(MetricRow.kind == kind)
            return [
                (r.node_id, MetricRecord(r.kind, r.generation, dict(r.values)))
                for r in session.scalars(query)
            ]

    def record_rejection(
        self,
        session,  # type: ignore[no-untyped-def]
        update_id: str,
        node_id: str,
        stage: str,
        reasons: Sequence[str],
        candidate_generation: int | None = None,
    ) -> None:
        session.add(
            RejectionRow(
                update_id=update_id,
                node_id=node_id,
                stage=stage,
                reasons=list(reasons),
                candidate_generation=candidate_generation,
            )
        )
        LOGGER.warning(
            "update %s from %s rejected (%s): %s", update_id, node_id, stage, "; ".join(reasons)
        )

    def list_rejections(self, limit: int = 100) -> list[RejectionView]:
        with self.store.session() as session:
            rows = session.scalars(
                select(RejectionRow).order_by(RejectionRow.id.desc()).limit(limit or 100)
            ).all()
            return [
                RejectionView(
                    update_id=r.update_id,
                    node_id=r.node_id,
                    stage=r.stage,
                    reasons=tuple(r.reasons),
                    created_at=as_utc(r.created_at),
                    candidate_generation=-1
                    if r.candidate_generation is None
                    else r.candidate_generation,
                )
                for r in rows
            ]

    def fetch_evaluation_tasks(self, node_id: str) -> list[EvaluationTaskView]:
        now = utcnow()
        with self.store.session() as session:
            done = select(EvaluationResultRow.task_id).where(EvaluationResultRow.node_id == node_id)
            rows = session.scalars(
                select(EvaluationTaskRow).where(
                    EvaluationTaskRow.open, EvaluationTaskRow.task_id.not_in(done)
                )
            ).all()
            return [
                EvaluationTaskView(
                    r.task_id, r.candidate_generation, r.reference_generation, as_utc(r.deadline)
                )
                for r in rows
                if as_utc(r.deadline) > now
            ]

    def submit_evaluation_result(
        self, node_id: str, task_id: str, candidate: float, reference: float, num_cases: int
    ) -> bool:
        if not (math.isfinite(candidate) and math.isfinite(reference)) or num_cases < 1:
            raise InvalidRequest("scores must be finite and num_cases at least 1")
        with self.store.session() as session:
            task = session.get(EvaluationTaskRow, task_id)
            if task is None:
                raise NotFound(f"no evaluation task {task_id!r}")
            if not task.open:
                return False
            if session.get(EvaluationResultRow, (task_id, node_id)) is not None:
                return False
            session.add(
                EvaluationResultRow(
                    task_id=task_id,
                    node_id=node_id,
                    candidate_score=candidate,
                    reference_score=reference,
                    num_cases=num_cases,
                )
            )
        self.aggregator.wake()
        return True
