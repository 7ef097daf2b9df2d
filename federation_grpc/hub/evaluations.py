"""Federated evaluation tasks: a candidate generation scored by nodes on their own cases.

The aggregator opens a task when a merged candidate needs the nodes' verdict
(``[gate] federated_evaluation``) and settles it from the results (see ``aggregator``);
nodes fetch the open tasks they have not answered and submit one result each. A node
that asks for tasks takes part: the hub counts it among the evaluators (``"auto"`` is on
with two of them) and waits for its answer while it keeps asking. An answer with no
cases says the node cannot judge (no held-out cases for the model).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from federation_grpc.errors import InvalidRequest, NotFound
from federation_grpc.hub.domain import EvaluationTaskView
from federation_grpc.hub.nodes import SeenThrottle
from federation_grpc.hub.store import (
    EvaluationResultRow,
    EvaluationTaskRow,
    HubStore,
    NodeRow,
    as_utc,
    utcnow,
)


class EvaluationTasks:
    def __init__(self, store: HubStore) -> None:
        self.store = store
        self._seen = SeenThrottle()  # a node asking again soon is not written again

    @staticmethod
    def evaluators(session: Session, window_s: float) -> set[str]:
        """Active nodes that asked for evaluation tasks within the last ``window_s``."""
        since = utcnow() - timedelta(seconds=window_s)
        return set(session.scalars(select(NodeRow.node_id).where(
            NodeRow.evaluator_seen >= since, NodeRow.revoked.is_(False))))

    def _mark_evaluator(self, session: Session, node_id: str, now: datetime) -> None:
        if not self._seen.due(node_id, now):
            return
        row = session.get(NodeRow, node_id)
        if row is not None:
            row.evaluator_seen = now
            self._seen.written(node_id, now)

    def open(self, session: Session, candidate: int, reference: int, timeout_s: float) -> None:
        """Ask the nodes to score ``candidate`` against ``reference`` (caller's transaction)."""
        session.add(
            EvaluationTaskRow(
                task_id=str(uuid.uuid4()),
                candidate_generation=candidate,
                reference_generation=reference,
                deadline=utcnow() + timedelta(seconds=timeout_s),
            )
        )

    @staticmethod
    def open_task(session: Session) -> EvaluationTaskRow | None:
        return session.scalar(select(EvaluationTaskRow).where(EvaluationTaskRow.open))

    @staticmethod
    def results(session: Session, task_id: str) -> list[EvaluationResultRow]:
        return list(
            session.scalars(
                select(EvaluationResultRow).where(EvaluationResultRow.task_id == task_id)
            )
        )

    def is_open_for(self, candidate: int) -> bool:
        """Whether nodes may download ``candidate`` to evaluate it now."""
        with self.store.session() as session:
            task = session.scalar(
                select(EvaluationTaskRow).where(
                    EvaluationTaskRow.candidate_generation == candidate, EvaluationTaskRow.open
                )
            )
        return task is not None

    def fetch(self, node_id: str) -> list[EvaluationTaskView]:
        """The open tasks ``node_id`` has not answered, before their deadline; asking
        makes the node one of the evaluators."""
        now = utcnow()
        with self.store.session() as session:
            self._mark_evaluator(session, node_id, now)
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

    def submit(
        self, node_id: str, task_id: str, candidate: float, reference: float, num_cases: int
    ) -> bool:
        """Store a node's scores (``num_cases`` 0: it cannot judge, the scores are not
        read); False if the task is closed or the node answered."""
        if not (math.isfinite(candidate) and math.isfinite(reference)) or num_cases < 0:
            raise InvalidRequest("scores must be finite and num_cases not negative")
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
        return True
