"""The aggregator: pending updates -> strategy merge -> gate -> new generation (or not).

One aggregator thread per hub process merges, and replicas sharing a database take
turns (:mod:`federation_grpc.hub.merge_lock`); a merge and the bookkeeping of its updates
commit in one transaction, so an update is merged exactly once even if the hub dies
half-way (it stays RECEIVED and is merged after the restart).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from federation_grpc.hub import aggregation as agg
from federation_grpc.hub.gate import compare_scores, paired_mean
from federation_grpc.hub.heads import mark_trained
from federation_grpc.hub.merge_lock import merge_lock
from federation_grpc.hub.robust import clip_delta
from federation_grpc.hub.store import (
    EvaluationResultRow,
    EvaluationTaskRow,
    GenerationRow,
    GenerationStatus,
    UpdateRow,
    UpdateStatus,
    utcnow,
)
from federation_grpc.hub.tensorfile import read_tensors

if TYPE_CHECKING:
    from federation_grpc.hub.service import HubService

LOGGER = logging.getLogger(__name__)

_TICK_S = 5.0


class Aggregator:
    def __init__(self, service: HubService) -> None:
        self.service = service
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="hub-aggregator", daemon=True)
            self._thread.start()
            self._wake.set()  # merge what a previous run left RECEIVED

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(_TICK_S)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.process_pending()
            except Exception:  # keep merging later; the updates stay RECEIVED
                LOGGER.exception("aggregation failed; will retry")

    def process_pending(self) -> list[int]:
        """Merge while enough updates wait; return the numbers of new current generations."""
        made: list[int] = []
        # The database lock makes replicas sharing one database merge one at a time.
        with self._lock, merge_lock(self.service.store.engine, self.service.config.data_dir):
            if self._decide_open_candidate():
                return made
            while True:
                if self.service.current_number() is None:
                    return made
                pending = self._pending_in_lineage()
                strategy = self.service.strategy
                size = max(1, strategy.batch_size())
                if len(pending) < size:
                    return made
                number = self._merge(pending[: max(size, strategy.max_batch())])
                if number == -2:  # a candidate now waits for federated evaluation
                    return made
                if number >= 0:
                    made.append(number)

    def _pending_in_lineage(self) -> list[UpdateRow]:
        current = self.service.require_current()
        lineage = self.service.lineage(current.number)
        pending = self.service.uploads.pending_rows()
        keep = []
        for row in pending:
            if row.base_generation in lineage:
                keep.append(row)
                continue
            reason = (
                f"base generation {row.base_generation} is not in the lineage of the current "
                f"generation {current.number} (rolled back)"
            )
            self._reject([row], [reason], None)
        return keep

    def _merge(self, rows: Sequence[UpdateRow]) -> int:
        service = self.service
        current = service.require_current()
        lineage = service.lineage(current.number)
        current_tensors = service.generation_tensors(current.number)
        contributions = [
            agg.Contribution(
                tensors=self._clipped(row, read_tensors(service.blobs.path(row.sha256))),
                base=service.generation_tensors(row.base_generation),
                num_samples=row.num_samples,
                staleness=lineage.index(row.base_generation),
            )
            for row in rows
        ]
        for row, (asked, given) in zip(
            rows, agg.capped_shares_report(service.strategy, contributions), strict=True
        ):
            if given < asked - 1e-9:
                LOGGER.info(
                    "update %s from %s (num_samples %d): merge share %.4f capped to %.4f "
                    "([aggregation] max_update_share)",
                    row.update_id, row.node_id, row.num_samples, asked, given,
                )
        candidate = service.strategy.merge(current_tensors, contributions)
        if service.gate.evaluator is None and service.config.gate.federated_evaluation:
            bad = agg.non_finite_tensors(candidate)
            if bad:
                self._reject(rows, [f"merged candidate has non-finite values in {bad[:5]}"], None)
                return -1
            self._open_candidate(rows, candidate, current.number, current.config_json)
            return -2
        verdict = service.gate.check_candidate(
            candidate, current.number, current_tensors, current.config_json
        )
        if not verdict.accepted:
            if len(rows) > 1 and service.strategy.batch_size() == 1:
                # One harmful update must not sink the others folded with it: retry alone.
                LOGGER.info("fold of %d updates refused; merging them one by one", len(rows))
                numbers = [self._merge([row]) for row in rows]
                return max(numbers)
            self._reject(rows, verdict.reasons, None)
            return -1
        number = self._publish(
            rows, candidate, current.number, current.config_json, verdict.candidate_score
        )
        service.gate.remember(number, verdict.candidate_score)
        return number

    def _clipped(self, row: UpdateRow, tensors: agg.Tensors) -> agg.Tensors:
        """The update with its delta clipped to ``[aggregation] clip_norm`` (0: as is)."""
        limit = self.service.config.aggregation.clip_norm
        if limit <= 0:
            return tensors
        base = self.service.generation_tensors(row.base_generation)
        clipped, norm = clip_delta(tensors, base, limit)
        if norm > limit:
            LOGGER.info(
                "update %s from %s clipped: delta norm %.4g scaled to %.4g",
                row.update_id, row.node_id, norm, limit,
            )
        return clipped

    def _store_generation(
        self,
        session,  # type: ignore[no-untyped-def]
        candidate: dict,  # type: ignore[type-arg]
        parent: int,
        config_json: str,
        status: GenerationStatus,
        score: float | None,
    ) -> int:
        sha, size = self.service.blobs.put_tensors(candidate)
        config_json = mark_trained(config_json, candidate)  # a new head's first weights
        number = (session.scalar(select(func.max(GenerationRow.number))) or 0) + 1
        session.add(
            GenerationRow(
                number=number,
                parent=parent,
                sha256=sha,
                size_bytes=size,
                config_json=config_json,
                strategy=self.service.strategy.name,
                status=status,
                validation_score=score,
            )
        )
        session.flush()
        return number

    def _publish(
        self,
        rows: Sequence[UpdateRow],
        candidate: dict,  # type: ignore[type-arg]
        parent: int,
        config_json: str,
        score: float | None,
    ) -> int:
        service = self.service
        with service.store.session() as session:
            number = self._store_generation(
                session, candidate, parent, config_json, GenerationStatus.ACTIVE, score
            )
            self._mark_merged(session, rows, number)
            service._set_current(session, number)
        service._notify()
        LOGGER.info(
            "generation %d published from %d update(s) on top of %d", number, len(rows), parent
        )
        return number

    def _mark_merged(self, session, rows: Sequence[UpdateRow], number: int) -> None:  # type: ignore[no-untyped-def]
        for stale in rows:
            row = _locked_update(session, stale.update_id)
            row.status, row.merged_into = UpdateStatus.MERGED, number

    def _reject(
        self, rows: Sequence[UpdateRow], reasons: Sequence[str], candidate: int | None
    ) -> None:
        with self.service.store.session() as session:
            for stale in rows:
                row = _locked_update(session, stale.update_id)
                row.status, row.reason = UpdateStatus.REJECTED, "; ".join(reasons)
                self.service.record_rejection(
                    session, row.update_id, row.node_id, "gate", reasons, candidate
                )

    # --- federated evaluation -----------------------------------------------------------

    def _open_candidate(
        self,
        rows: Sequence[UpdateRow],
        candidate: dict,  # type: ignore[type-arg]
        reference: int,
        config_json: str,
    ) -> None:
        gate = self.service.config.gate
        with self.service.store.session() as session:
            number = self._store_generation(
                session, candidate, reference, config_json, GenerationStatus.CANDIDATE, None
            )
            for stale in rows:
                row = _locked_update(session, stale.update_id)
                row.status, row.candidate_generation = UpdateStatus.EVALUATING, number
            session.add(
                EvaluationTaskRow(
                    task_id=str(uuid.uuid4()),
                    candidate_generation=number,
                    reference_generation=reference,
                    deadline=utcnow() + timedelta(seconds=gate.evaluation_timeout_s),
                )
            )
        LOGGER.info("candidate %d waits for federated evaluation", number)

    def _decide_open_candidate(self) -> bool:
        """Settle an open federated evaluation if it can be; True while one stays open."""
        service = self.service
        gate = service.config.gate
        with service.store.session() as session:
            task = session.scalar(select(EvaluationTaskRow).where(EvaluationTaskRow.open))
            if task is None:
                return False
            results = session.scalars(
                select(EvaluationResultRow).where(EvaluationResultRow.task_id == task.task_id)
            ).all()
            deadline = (
                task.deadline
                if task.deadline.tzinfo
                else task.deadline.replace(tzinfo=utcnow().tzinfo)
            )
            if len(results) < gate.min_evaluations and deadline > utcnow():
                return True
            number = task.candidate_generation
            rows = session.scalars(
                select(UpdateRow).where(UpdateRow.candidate_generation == number)
            ).all()
            generation = session.get(GenerationRow, number)
            assert generation is not None
            if len(results) < gate.min_evaluations:
                reasons = [
                    f"federated evaluation got {len(results)} of {gate.min_evaluations} "
                    "results before the deadline"
                ]
                score = None
            else:
                score, reference = paired_mean(
                    [r.candidate_score for r in results],
                    [r.reference_score for r in results],
                    [r.num_cases for r in results],
                )
                reasons = compare_scores(score, reference, gate.validation_margin)
            task.open = False
            generation.validation_score = score
            if reasons:
                generation.status = GenerationStatus.REJECTED
                for row in rows:
                    row.status, row.reason = UpdateStatus.REJECTED, "; ".join(reasons)
                    service.record_rejection(
                        session, row.update_id, row.node_id, "gate", reasons, number
                    )
            else:
                generation.status = GenerationStatus.ACTIVE
                for row in rows:
                    row.status, row.merged_into = UpdateStatus.MERGED, number
                service._set_current(session, number)
        if not reasons:
            service._notify()
            LOGGER.info("candidate %d accepted by federated evaluation", number)
        return False


def _locked_update(session, update_id: str) -> UpdateRow:  # type: ignore[no-untyped-def]
    """The update's row, locked for this transaction (it was read moments ago: a
    missing row means the store changed under the merge, which must stop it)."""
    row = session.get(UpdateRow, update_id, with_for_update=True)
    if row is None:
        raise RuntimeError(f"update {update_id} vanished from the hub store during a merge")
    return row
