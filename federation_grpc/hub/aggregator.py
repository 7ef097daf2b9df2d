"""The aggregator: pending updates -> strategy merge -> gate -> new generation (or not).

One aggregator thread per hub process merges, and replicas sharing a database take
turns (:mod:`federation_grpc.hub.merge_lock`); a merge and the bookkeeping of its updates
commit in one transaction, so an update is merged exactly once even if the hub dies
half-way (it stays RECEIVED and is merged after the restart).

Updates, bases and the current generation are read as memory maps and merged block by
block into the candidate's file (:mod:`~federation_grpc.hub.streamed_merge`); the gate
reads the candidate from that file, which becomes the generation's blob as it is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import func, select

from federation_grpc.hub import strategies as agg
from federation_grpc.hub.blobs import BlobStore
from federation_grpc.hub.config import HubConfig
from federation_grpc.hub.contributions import Contribution, Tensors
from federation_grpc.hub.evaluations import EvaluationTasks
from federation_grpc.hub.federated_verdict import judge, waiting
from federation_grpc.hub.gate import SiteScore, UpdateGate
from federation_grpc.hub.generations import CurrentMoved, GenerationLedger, NewGeneration
from federation_grpc.hub.heads import mark_trained
from federation_grpc.hub.parameters import non_finite_tensors
from federation_grpc.hub.rejections import RejectionLog
from federation_grpc.hub.robust import clip_scale, delta_norm
from federation_grpc.hub.store import (
    GenerationStatus,
    HubStore,
    UpdateRow,
    UpdateStatus,
    as_utc,
    locked_update,
    utcnow,
)
from federation_grpc.hub.streamed_merge import merge_to_file
from federation_grpc.hub.tensorfile import read_tensors

LOGGER = logging.getLogger(__name__)

_TICK_S = 5.0
SETTLE_S = 0.05
# The received updates by base generation, at every wake: built once.
_WAITING_BY_BASE = (select(UpdateRow.base_generation, func.count())
                    .where(UpdateRow.status == UpdateStatus.RECEIVED)
                    .group_by(UpdateRow.base_generation))


class Aggregator:
    def __init__(
        self,
        *,
        store: HubStore,
        ledger: GenerationLedger,
        rejections: RejectionLog,
        evaluations: EvaluationTasks,
        blobs: BlobStore,
        config: HubConfig,
        gate: UpdateGate,
        strategy: agg.Strategy,
        settle_s: float = SETTLE_S,
    ) -> None:
        """``settle_s``: how long a wake waits for more before a pass."""
        self.store = store
        self.settle_s = settle_s
        self.ledger = ledger
        self.rejections = rejections
        self.evaluations = evaluations
        self.blobs = blobs
        self.config = config
        self.gate = gate
        self.strategy = strategy
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
            # Every received update wakes the aggregator: the updates of a burst that
            # arrive within the settling time are taken by one pass, not one pass each.
            self._stop.wait(self.settle_s)
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
        with self._lock, self.ledger.merge_lock():
            if self._decide_open_candidate():
                return made
            while True:
                current = self.ledger.current_number()
                if current is None:
                    return made
                size = max(1, self.strategy.batch_size())
                lineage = set(self.ledger.lineage(current))
                if not self._may_merge(lineage, size):
                    return made
                pending = self._pending_in_lineage(current, lineage)
                if len(pending) < size:
                    return made
                try:
                    number = self._merge(pending[: max(size, self.strategy.max_batch())])
                except CurrentMoved as exc:  # the operator moved the pointer meanwhile
                    LOGGER.warning("merge dropped: %s; its updates wait for the next", exc)
                    continue
                if number == -2:  # a candidate now waits for federated evaluation
                    return made
                if number >= 0:
                    made.append(number)

    def pending_updates(self) -> list[UpdateRow]:
        """Received updates waiting for a merge, oldest first."""
        with self.store.session() as session:
            return list(
                session.scalars(
                    select(UpdateRow)
                    .where(UpdateRow.status == UpdateStatus.RECEIVED)
                    .order_by(UpdateRow.received_at, UpdateRow.update_id)
                )
            )

    def _may_merge(self, lineage: set[int], size: int) -> bool:
        """Whether ``size`` received updates on ``lineage`` (the current generation's)
        wait, or one off it waits to be refused. Counted by base generation in one query: the hub
        wakes the aggregator at every received update, and loading every waiting row at
        each wake made a burst into a buffer (FedBuff) cost its square."""
        with self.store.engine.connect() as connection:
            waiting = connection.execute(_WAITING_BY_BASE).all()
        on_lineage = sum(count for base, count in waiting if base in lineage)
        return on_lineage >= size or any(base not in lineage for base, _ in waiting)

    def _pending_in_lineage(self, current: int, lineage: set[int]) -> list[UpdateRow]:
        """Received updates on ``lineage`` (``current``'s), oldest first; those off it are
        refused."""
        keep = []
        for row in self.pending_updates():
            if row.base_generation in lineage:
                keep.append(row)
                continue
            reason = (
                f"base generation {row.base_generation} is not in the lineage of the current "
                f"generation {current} (rolled back)"
            )
            self._reject([row], [reason])
        return keep

    def _merge(self, rows: Sequence[UpdateRow]) -> int:
        scratches: list[Path] = []
        try:
            return self._merge_into(rows, scratches)
        finally:
            for scratch in scratches:  # adopted into the blob store, or refused
                scratch.unlink(missing_ok=True)

    def _scratch(self, scratches: list[Path]) -> Path:
        """A new scratch file (each candidate its own: an earlier one may still be
        mapped by its readers), removed by :meth:`_merge` unless adopted."""
        scratches.append(self.blobs.scratch_path())
        return scratches[-1]

    def _merged_candidate(
        self, scratches: list[Path], current: Tensors, contributions: Sequence[Contribution],
        scales: Sequence[float],
    ) -> tuple[Path, str, int, Tensors]:
        """The strategy's merge of ``contributions`` (each delta scaled by its scale) onto
        ``current``, written to a new scratch file: ``(file, sha256, size, its tensors)``."""
        scratch = self._scratch(scratches)
        sha, size = merge_to_file(scratch, self.strategy, current, contributions, scales)
        return scratch, sha, size, read_tensors(scratch)

    def _merge_into(self, rows: Sequence[UpdateRow], scratches: list[Path]) -> int:
        ledger = self.ledger
        current = ledger.require_current()
        lineage = ledger.lineage(current.number)
        current_tensors = ledger.generation_tensors(current.number)
        contributions = [
            Contribution(
                tensors=read_tensors(self.blobs.path(row.sha256)),
                base=ledger.generation_tensors(row.base_generation),
                num_samples=row.num_samples,
                staleness=lineage.index(row.base_generation),
            )
            for row in rows
        ]
        for row, (asked, given) in zip(
            rows, agg.capped_shares_report(self.strategy, contributions), strict=True
        ):
            if given < asked - 1e-9:
                LOGGER.info(
                    "update %s from %s (num_samples %d): merge share %.4f capped to %.4f "
                    "([aggregation] max_update_share)",
                    row.update_id, row.node_id, row.num_samples, asked, given,
                )
        scales = [self._clip_scale(row, c) for row, c in zip(rows, contributions, strict=True)]
        scratch, sha, size, candidate = self._merged_candidate(
            scratches, current_tensors, contributions, scales)
        if self.gate.evaluator is None and self.config.gate.federated(self._evaluators):
            bad = non_finite_tensors(candidate)
            if bad:
                self._reject(rows, [f"merged candidate has non-finite values in {bad[:5]}"])
                return -1
            self._open_candidate(
                rows, self._new_generation(scratch, sha, size, candidate, current.number,
                                           current.config_json, None), current.number)
            return -2
        verdict = self.gate.check_candidate(
            candidate, current.number, current_tensors, current.config_json
        )
        if not verdict.accepted and len(rows) > 1 and self.strategy.batch_size() == 1:
            # One harmful update must not sink the others folded with it: retry alone.
            LOGGER.info("fold of %d updates refused; merging them one by one", len(rows))
            numbers = [self._merge([row]) for row in rows]
            return max(numbers)
        step = 1.0
        for _ in range(self.config.gate.backtrack):
            if verdict.accepted or verdict.candidate_score is None:
                break  # accepted, or refused for a reason a smaller step does not mend
            step /= 2
            LOGGER.info("candidate from %s scored %.4f against %.4f; merging again at "
                        "1/%d of the step", ", ".join(r.update_id for r in rows),
                        verdict.candidate_score, verdict.reference_score or 0.0,
                        round(1 / step))
            scratch, sha, size, candidate = self._merged_candidate(
                scratches, current_tensors, contributions, [scale * step for scale in scales])
            verdict = self.gate.check_candidate(
                candidate, current.number, current_tensors, current.config_json
            )
        if not verdict.accepted:
            reasons = list(verdict.reasons)
            if step < 1.0 and verdict.candidate_score is not None:
                reasons.append(f"also refused at 1/{round(1 / step)} of its step "
                               "([gate] backtrack)")
            self._reject(rows, reasons)
            return -1
        new = self._new_generation(
            scratch, sha, size, candidate, current.number, current.config_json,
            verdict.candidate_score,
        )
        try:
            with self.store.session() as session:
                number = ledger.publish(session, new, merged=[row.update_id for row in rows])
        except CurrentMoved:
            ledger.drop_unused_blob(new.sha256)
            raise
        LOGGER.info(
            "generation %d published from %d update(s) on top of %d%s",
            number, len(rows), current.number,
            f" at 1/{round(1 / step)} of their step" if step < 1.0 else "",
        )
        self.gate.remember(number, verdict.candidate_score)
        return number

    def _clip_scale(self, row: UpdateRow, contribution: Contribution) -> float:
        """The factor scaling the update's delta to ``[aggregation] clip_norm`` (1: as is)."""
        limit = self.config.aggregation.clip_norm
        if limit <= 0:
            return 1.0
        norm = delta_norm(contribution.tensors, contribution.base)
        scale = clip_scale(norm, limit)
        if scale < 1.0:
            LOGGER.info(
                "update %s from %s clipped: delta norm %.4g scaled to %.4g",
                row.update_id, row.node_id, norm, limit,
            )
        return scale

    def _new_generation(
        self,
        scratch: Path,
        sha: str,
        size: int,
        candidate: Tensors,
        parent: int,
        config_json: str,
        score: float | None,
    ) -> NewGeneration:
        """The merged file as a blob; a new head it carries is marked trained."""
        self.blobs.adopt(scratch, sha)
        config_json = mark_trained(config_json, candidate)  # a new head's first weights
        return NewGeneration(parent, sha, size, config_json, self.strategy.name, score)

    def _reject(
        self, rows: Sequence[UpdateRow], reasons: Sequence[str], candidate: int | None = None
    ) -> None:
        with self.store.session() as session:
            for stale in rows:
                row = locked_update(session, stale.update_id)
                self.rejections.reject(session, row, "gate", reasons, candidate)

    # --- federated evaluation -----------------------------------------------------------

    def _open_candidate(
        self, rows: Sequence[UpdateRow], new: NewGeneration, reference: int
    ) -> None:
        with self.store.session() as session:
            number = self.ledger.record(
                session, new, GenerationStatus.CANDIDATE, evaluated=[r.update_id for r in rows]
            )
            self.evaluations.open(
                session, number, reference, self.config.gate.evaluation_timeout_s
            )
        LOGGER.info("candidate %d waits for federated evaluation", number)

    def _evaluators(self) -> int:
        """How many nodes take part in federated evaluation now."""
        with self.store.session() as session:
            return len(self.evaluations.evaluators(session, self.config.gate.evaluator_window_s))

    def _decide_open_candidate(self) -> bool:
        """Settle an open federated evaluation if it can be; True while one stays open."""
        gate = self.config.gate
        with self.store.session() as session:
            task = self.evaluations.open_task(session)
            if task is None:
                return False
            number = task.candidate_generation
            current = self.ledger.current_in(session)
            if self.ledger.parent_of(session, number) != current:
                # An operator's promote or rollback moved the pointer: the nodes' work on
                # this candidate would be for nothing (settle could never publish it).
                task.open = False
                self.ledger.abandon(session, number, [
                    f"the current generation moved to {current} before the nodes' verdict"])
                LOGGER.warning("candidate %d abandoned: the current generation moved to %s; "
                               "its updates wait for a merge again", number, current)
                return False
            answers = [SiteScore(r.node_id, r.candidate_score, r.reference_score, r.num_cases)
                       for r in self.evaluations.results(session, task.task_id)]
            evaluators = self.evaluations.evaluators(session, gate.evaluator_window_s)
            if waiting(answers, evaluators, as_utc(task.deadline) <= utcnow(), gate):
                return True
            verdict = judge(answers, evaluators, gate)
            if verdict.notes:
                LOGGER.warning("candidate %d: %s", number, "; ".join(verdict.notes))
            task.open = False
            if not verdict.accepted:
                for row in self.ledger.evaluated_updates(session, number):
                    self.rejections.reject(session, row, "gate", verdict.reasons, number)
            published = self.ledger.settle(session, number, verdict.score,
                                            accepted=verdict.accepted, notes=verdict.notes)
        if published:
            LOGGER.info("candidate %d accepted by federated evaluation", number)
        elif verdict.accepted:
            LOGGER.warning("candidate %d accepted by federated evaluation, but the current "
                           "generation moved meanwhile: its updates wait for a merge again",
                           number)
        return False
